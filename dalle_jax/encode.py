"""Stage-2 data: a dataset encoded ONCE into (text ids, image ids) records.

`encode_split(model, tokenizer, split, out_dir, ...)` reads every example of a prepared split
in order, tokenizes its caption (`TextTokenizer.encode`, fixed `text_length`) and turns its
image into vqvae ids (`vqvae.model.encode`), and writes the records with
`pipeline.write_encoded_shards`; `pipeline.encoded_dataset(out_dir, ...)` reads them back.
`encode_dataset(...)` is what `train encode` calls: it loads the vqvae and the tokenizer, checks
every split and output folder first, then encodes each split into `OUT/<split>/`.

The vqvae runs jitted and data-parallel: a global batch of `batch_size` examples (rounded up to
a multiple of the device count) is split over the `data` mesh axis, and the last, short batch
is padded to the full size, so a whole dataset runs on one compiled program.

Multi-host: every process calls `encode_split` with the same arguments. Global batch g covers
examples [g*B, (g+1)*B); each process loads only the rows its own devices hold, the ids come
back replicated, and process 0 alone writes, so the output is one directory with records in
source order. The others wait at a barrier and then read the metadata back, so `out_dir` must
be on a filesystem every host sees (as checkpoints must be). Tested as two processes on one
machine (`train encode --coordinator-address/--num-processes/--process-id`,
tests/test_multihost_cli.py): they write the same records, bit for bit, as one process.
Not run on several machines.

A split is written under the name it was asked for: `OUT/validation/` holds the dataset's
validation split even where the dataset calls it otherwise (COCO's `val`; the metadata's
`extra["split"]` names the split actually read).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from dalle_jax.checkpoint import find_step_dir
from dalle_jax.data import pipeline
from dalle_jax.errors import UserError
from dalle_jax.tokenizer import TextTokenizer
from dalle_jax.vqvae_training import (
    batch_sharding,
    data_mesh,
    load_vqvae,
    pad_rows,
    replicated,
    round_up,
)
from vqvae.config import VQVAEConfig
from vqvae.model import VQVAE, create_model, encode

DEFAULT_SPLITS = ("train", "validation")


@functools.lru_cache(maxsize=4)
def compiled_encode(model_config: VQVAEConfig, mesh: Mesh) -> Callable:
    """`fn(model_state, images, text_ids) -> (image_ids int32 [B, h*w], text_ids int32 [B, T])`.

    images: uint8 [B, S, S, 3] and text_ids int32 [B, T], both split over `data`; the outputs
    come back replicated (every process holds the whole batch). Text ids only pass through, so
    that process 0 receives the rows other processes tokenized.
    """
    graphdef = nnx.split(nnx.eval_shape(lambda: create_model(model_config)))[0]

    def fn(state, images, text_ids):
        image_ids = encode(nnx.merge(graphdef, state), images)
        return image_ids.reshape(image_ids.shape[0], -1), text_ids

    rows = batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(replicated(mesh), rows, rows), out_shardings=replicated(mesh))


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The slice of every global batch that this process loads: rows [start, stop)."""

    start: int
    stop: int


def _process_rows(mesh: Mesh, batch_size: int, sample_shape: Sequence[int]) -> _Rows:
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size, *sample_shape))
    starts = [index[0].start or 0 for index in indices.values()]
    stops = [batch_size if index[0].stop is None else index[0].stop for index in indices.values()]
    return _Rows(min(starts), max(stops))


def _load(
    split: pipeline.Split,
    keys: list[int],
    *,
    image_size: int,
    tokenizer: TextTokenizer,
    text_length: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices -> (images uint8 [n, S, S, 3], text_ids int32 [n, T]), as training sees
    them: the dataset's normalize (epoch 0: index = source index), center-crop and resize."""
    images = np.zeros((len(keys), image_size, image_size, 3), np.uint8)
    captions = []
    raws = pipeline.read_examples(split.source, keys) if keys else []
    for row, (key, raw) in enumerate(zip(keys, raws, strict=True)):
        example = split.normalize(raw, key)
        images[row] = pipeline.prepare_image(example["image"], image_size)
        caption = example["caption"]
        captions.append(caption.decode("utf-8") if isinstance(caption, bytes) else caption)
    return images, tokenizer.encode(captions, text_length)


def _encoded_batches(
    model: VQVAE,
    tokenizer: TextTokenizer,
    split: pipeline.Split,
    *,
    text_length: int,
    batch_size: int,
    mesh: Mesh,
    show_progress: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (text_ids int32 [n, T], image_ids int32 [n, h*w]) per global batch, in source
    order, padding rows dropped. Loads batch g+1 in a thread while the devices encode batch g."""
    config = model.config
    size = config.image_size
    num_examples = split.num_examples
    rows = _process_rows(mesh, batch_size, (size, size, 3))
    state = jax.device_put(nnx.state(model), replicated(mesh))
    encode_fn = compiled_encode(config, mesh)
    load = functools.partial(
        _load, split, image_size=size, tokenizer=tokenizer, text_length=text_length
    )

    def load_batch(start: int) -> tuple[np.ndarray, np.ndarray]:
        keys = range(start + rows.start, min(start + rows.stop, num_examples))
        images, text_ids = load(list(keys))
        local_rows = rows.stop - rows.start
        return pad_rows(images, local_rows), pad_rows(text_ids, local_rows)

    starts = range(0, num_examples, batch_size)
    sharding = batch_sharding(mesh)
    bar = tqdm(
        total=num_examples,
        unit="img",
        desc=f"encoding {split.name}",
        disable=True if not show_progress or jax.process_index() != 0 else None,
    )
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as loader, bar:
        pending = loader.submit(load_batch, starts[0]) if starts else None
        for number, start in enumerate(starts):
            images, text_ids = pending.result()
            if number + 1 < len(starts):
                pending = loader.submit(load_batch, starts[number + 1])
            image_ids, all_text_ids = encode_fn(
                state,
                jax.make_array_from_process_local_data(
                    sharding, images, (batch_size, *images.shape[1:])
                ),
                jax.make_array_from_process_local_data(
                    sharding, text_ids, (batch_size, *text_ids.shape[1:])
                ),
            )
            count = min(batch_size, num_examples - start)
            yield np.asarray(all_text_ids)[:count], np.asarray(image_ids)[:count]
            bar.update(count)


def _check_can_write(out_dir: Path, overwrite: bool) -> None:
    # The same test `write_encoded_shards` makes, made before any encoding starts (and on every
    # process, so none of them starts encoding alone).
    if overwrite or not out_dir.is_dir():
        return
    if (out_dir / pipeline.ENCODED_METADATA_FILE).exists() or any(
        out_dir.glob("encoded-*.array_record")
    ):
        raise UserError(
            f"{str(out_dir)!r} already holds encoded data; remove it, pick another --out or "
            "pass --overwrite"
        )


def encode_split(
    model: VQVAE,
    tokenizer: TextTokenizer,
    split: pipeline.Split,
    out_dir: str | Path,
    *,
    text_length: int,
    batch_size: int,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    records_per_shard: int = 50_000,
    mesh: Mesh | None = None,
    show_progress: bool = True,
) -> pipeline.EncodedMetadata:
    """Encodes every example of `split` into `out_dir` (see the module docstring).

    Record i is example i of the split: text_ids int32 [text_length] (the tokenizer's, padded
    with PAD_ID) then image_ids int32 [h*w] (`vqvae.model.encode` of the image center-cropped
    and resized to the vqvae's size). The metadata's `extra` holds the dataset, split, example
    count, image size and vqvae config, plus `extra`. `mesh` defaults to all devices.
    Returns the metadata (`pipeline.read_encoded_metadata(out_dir)` reads it again).
    """
    if text_length < 1:
        raise UserError(f"text length must be at least 1, got {text_length}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    out_dir = Path(out_dir)
    _check_can_write(out_dir, overwrite)
    mesh = data_mesh() if mesh is None else mesh
    batch_size = round_up(batch_size, mesh.size)
    dataset, _, split_name = split.name.rpartition(":")
    config = model.config
    metadata_extra = {
        "dataset": dataset or split.name,
        "split": split_name,
        "num_examples": split.num_examples,
        "image_size": config.image_size,
        "vqvae_config": config.to_dict(),
        "text_length": text_length,
        **dict(extra or {}),
    }
    batches = _encoded_batches(
        model,
        tokenizer,
        split,
        text_length=text_length,
        batch_size=batch_size,
        mesh=mesh,
        show_progress=show_progress,
    )
    if jax.process_index() != 0:
        for _ in batches:  # the collectives need every process; process 0 writes
            pass
        _barrier(f"encode {out_dir}")
        return pipeline.read_encoded_metadata(out_dir)
    records = (
        {"text_ids": text_ids, "image_ids": image_ids}
        for text_batch, image_batch in batches
        for text_ids, image_ids in zip(text_batch, image_batch, strict=True)
    )
    metadata = pipeline.write_encoded_shards(
        out_dir,
        records,
        text_length=text_length,
        image_grid=(config.grid_size, config.grid_size),
        text_vocab_size=tokenizer.vocab_size,
        image_vocab_size=config.codebook_size,
        records_per_shard=records_per_shard,
        extra=metadata_extra,
        overwrite=overwrite,
    )
    _barrier(f"encode {out_dir}")
    return metadata


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def encode_dataset(
    vqvae_path: str | Path,
    tokenizer_path: str | Path,
    dataset: str,
    out_dir: str | Path,
    *,
    splits: Sequence[str] = DEFAULT_SPLITS,
    text_length: int = 32,
    batch_size: int = 256,
    data_dir: str | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, pipeline.EncodedMetadata]:
    """`train encode`: encodes each split of a prepared dataset into `OUT/<split>/`.

    vqvae_path: a `train vqvae` workdir (its latest checkpoint) or one checkpoint step folder;
    tokenizer_path: a `.model` file from `train tokenizer`. Everything is checked (vqvae,
    tokenizer, dataset, splits, free output folders) before the first example is encoded.
    The metadata's `extra` also records the vqvae path and the checkpoint folder it resolved
    to, and the tokenizer's path and sha256.
    Returns split -> metadata.
    """
    splits = list(dict.fromkeys(splits))
    if not splits:
        raise UserError("no splits to encode; pass e.g. --splits train,validation")
    out_dir = Path(out_dir)
    for split in splits:
        if not split or "/" in split or split.startswith("."):
            raise UserError(f"bad split name {split!r}; pass names like train,validation")
        _check_can_write(out_dir / split, overwrite)
    checkpoint = find_step_dir(vqvae_path, flag="--vqvae")  # the workdir's latest, now
    model = load_vqvae(str(checkpoint))
    tokenizer = TextTokenizer.from_file(tokenizer_path)
    opened = {
        split: pipeline.open_split(dataset, split, data_dir=data_dir, **dict(builder_kwargs or {}))
        for split in splits
    }
    extra = {
        "vqvae": str(Path(vqvae_path).resolve()),
        "vqvae_checkpoint": str(Path(checkpoint).resolve()),
        "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_bytes()).hexdigest(),
    }
    return {
        split: encode_split(
            model,
            tokenizer,
            opened[split],
            out_dir / split,
            text_length=text_length,
            batch_size=batch_size,
            extra=extra,
            overwrite=overwrite,
            show_progress=show_progress,
        )
        for split in splits
    }
