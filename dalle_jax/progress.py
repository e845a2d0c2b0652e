"""A progress bar for training loops: process 0 only, on a terminal only unless forced.

```
with Progress(total=num_steps, initial=start_step, desc="vqvae") as progress:
    for step in range(start_step, num_steps):
        ...
        progress.update()
        if log_step:
            progress.set_metrics({"loss": loss, "psnr": psnr})   # pulls values to the host
            progress.write(f"step {step}: ...")                   # a log line under the bar
```
When the bar is off (another process, output piped to a file), `update` and `set_metrics` do
nothing and `write` prints plain lines, so logs stay readable.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import IO, Any

from tqdm import tqdm


def _format(value: float | int | bool) -> str:
    if isinstance(value, bool | int):
        return str(value)
    return f"{value:.4g}"


class Progress:
    """A tqdm bar over training steps, shown on process 0 when `file` is a terminal or `force`."""

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        desc: str = "train",
        force: bool = False,
        process_index: int | None = None,
        file: IO[str] | None = None,
    ):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.file = file if file is not None else sys.stderr
        self.is_main_process = process_index == 0
        is_tty = hasattr(self.file, "isatty") and self.file.isatty()
        self.enabled = self.is_main_process and (force or is_tty)
        self._bar = (
            tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                file=self.file,
                dynamic_ncols=True,
                smoothing=0.1,
            )
            if self.enabled
            else None
        )

    def update(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def set_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Shows a few metrics after the bar (`loss=2.31, psnr=24.1`); call on log steps only."""
        if self._bar is None:
            return
        from dalle_jax.metrics import to_host_scalars

        values = to_host_scalars(metrics)
        self._bar.set_postfix_str(
            ", ".join(f"{k}={_format(v)}" for k, v in values.items()), refresh=True
        )

    def write(self, line: str) -> None:
        """Prints a log line (process 0 only) without breaking the bar."""
        if not self.is_main_process:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
