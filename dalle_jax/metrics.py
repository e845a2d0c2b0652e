"""Metrics a person can look at: JSON lines, TensorBoard scalars and images, PNG files.

Layout under the run's workdir:
  metrics.jsonl               one `{"step": 100, "split": "train", "loss": 2.3, ...}` per write
  tb/                         TensorBoard event files (tensorboardX, no TensorFlow); tags
                              `{split}/{name}` for scalars, `{name}` for images
  images/{name}_{step:07d}.png  every image written

Only process 0 writes (the others get a writer that does nothing), so every process can call
the same methods. Values are pulled from the devices here, at write time: call the writer only
on log steps, so the train loop does not wait for the devices on every step.
JSON lines are appended, so a resumed run continues the file; steps between its last checkpoint
and the crash then appear twice, the later lines being the ones that count. Non-finite values
are written as `NaN`/`Infinity`, which Python's json and pandas read back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dalle_jax.images import save_png

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tb"
IMAGES_DIRNAME = "images"


def _to_python_scalar(name: str, value: Any) -> float | int | bool:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {list(array.shape)}")
    item = array.reshape(()).item()
    if isinstance(item, bool | int | float):
        return item
    raise ValueError(f"metric {name!r} must be numeric, got {type(item).__name__}")


def to_host_scalars(scalars: Mapping[str, Any]) -> dict[str, float | int | bool]:
    """Pulls a dict of scalars (jax or numpy arrays, Python numbers) to Python numbers.

    One `jax.device_get` for the whole dict; floats stay floats, integers stay integers.
    """
    values = jax.device_get(dict(scalars))
    return {name: _to_python_scalar(name, value) for name, value in values.items()}


def image_path(workdir: str | os.PathLike, name: str, step: int) -> str:
    """`WORKDIR/images/{name}_{step:07d}.png`, with '/' in `name` turned into '_'."""
    safe_name = name.replace("/", "_").replace(os.sep, "_")
    return os.path.join(os.fspath(workdir), IMAGES_DIRNAME, f"{safe_name}_{step:07d}.png")


class MetricWriter:
    """Writes scalars and image grids of a run; a no-op unless `enabled` (process 0 by default).

    ```
    with MetricWriter(workdir) as writer:
        writer.write_scalars(step, {"loss": loss, "psnr": psnr}, split="train")
        writer.write_images(step, {"reconstructions": grid})   # uint8 [H, W, 3]
    ```
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
        self.workdir = os.fspath(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # only process 0 pays for the import

            os.makedirs(self.workdir, exist_ok=True)
            self._jsonl = open(  # noqa: SIM115 (held open for the run, closed in close())
                os.path.join(self.workdir, METRICS_FILENAME), "a", encoding="utf-8"
            )
            self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TENSORBOARD_DIRNAME))

    def write_scalars(self, step: int, scalars: Mapping[str, Any], *, split: str = "train") -> None:
        """Appends one JSON line and one TensorBoard point per scalar (tag `{split}/{name}`)."""
        if not self.enabled:
            return
        values = to_host_scalars(scalars)
        record = {"step": int(step), "split": split, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tb.add_scalar(f"{split}/{name}", float(value), global_step=int(step))
        self._tb.flush()

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Writes each uint8 [H, W, 3] image to TensorBoard (tag `name`) and as a PNG file."""
        if not self.enabled:
            return
        for name, image in images.items():
            image = np.asarray(jax.device_get(image))
            if image.dtype != np.uint8 or image.ndim != 3:
                raise ValueError(
                    f"image {name!r} must be uint8 [H, W, C], got {image.dtype} {list(image.shape)}"
                )
            save_png(image_path(self.workdir, name, int(step)), image)
            self._tb.add_image(name, image, global_step=int(step), dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
