"""Throughput of stage 1: encode and decode images/s, and train steps/s, after warm-up.

    python bench/vqvae.py                      # shapes64: encode/decode at batch 64, train at 32
    python bench/vqvae.py --config emoji32 --iters 20

Prints one JSON line per measurement, then a table. Weights are freshly initialised: throughput
does not depend on them. (No bench/common.py existed when this was written, so it prints itself.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Run as `python bench/vqvae.py`, this file's folder comes first on sys.path, and this file's
# name would shadow the `vqvae` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from vqvae.config import get_config  # noqa: E402
from vqvae.model import create_model, decode, encode  # noqa: E402
from vqvae.train_config import get_train_config  # noqa: E402
from vqvae.train_step import create_optimizer, make_train_step  # noqa: E402


def _time(fn, iters: int, warmup: int) -> float:
    """Median seconds per call of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(config_name: str, batch: int, train_batch: int, iters: int, warmup: int) -> list[dict]:
    config = get_config(config_name)
    train_config = get_train_config(config_name)
    model = create_model(config)
    graphdef, state = nnx.split(model)
    encode_fn = jax.jit(lambda state, images: encode(nnx.merge(graphdef, state), images))
    decode_fn = jax.jit(lambda state, ids: decode(nnx.merge(graphdef, state), ids))

    rng = np.random.default_rng(0)
    size = config.image_size
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    ids = jax.block_until_ready(encode_fn(state, images))
    common = {"config": config_name, "device": jax.devices()[0].device_kind}
    results = []
    seconds = _time(lambda: encode_fn(state, images).block_until_ready(), iters, warmup)
    results.append({**common, "op": "encode", "batch": batch, "images_per_s": batch / seconds})
    seconds = _time(lambda: decode_fn(state, ids).block_until_ready(), iters, warmup)
    results.append({**common, "op": "decode", "batch": batch, "images_per_s": batch / seconds})

    if train_batch:
        optimizer = create_optimizer(model, train_config)
        train_graphdef, train_state = nnx.split((model, optimizer))
        step_fn = make_train_step(train_graphdef, train_config)
        train_images = rng.random((train_batch, size, size, 3), dtype=np.float32)
        key = jax.random.key(0)
        holder = {"state": train_state, "step": 0}

        def one_step():
            holder["state"], metrics = step_fn(holder["state"], train_images, holder["step"], key)
            holder["step"] += 1
            jax.block_until_ready(metrics)

        seconds = _time(one_step, iters, warmup)
        results.append(
            {
                **common,
                "op": "train_step",
                "batch": train_batch,
                "images_per_s": train_batch / seconds,
                "steps_per_s": 1.0 / seconds,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="shapes64", help="vqvae config name")
    parser.add_argument("--batch", type=int, default=64, help="encode/decode batch size")
    parser.add_argument("--train-batch", type=int, default=32, help="0 skips the train step")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (compile)")
    args = parser.parse_args()
    results = run(args.config, args.batch, args.train_batch, args.iters, args.warmup)
    for r in results:
        print(json.dumps(r))
    print(f"\n{'config':<12} {'op':<11} {'batch':>5} {'images/s':>10} {'steps/s':>8}  device")
    for r in results:
        steps = f"{r['steps_per_s']:.2f}" if "steps_per_s" in r else "-"
        print(
            f"{r['config']:<12} {r['op']:<11} {r['batch']:>5} {r['images_per_s']:>10.1f} "
            f"{steps:>8}  {r['device']}"
        )


if __name__ == "__main__":
    main()
