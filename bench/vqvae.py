"""Throughput of stage 1: encode and decode images/s, and train steps/s, after warm-up.

    python -m bench.vqvae                      # shapes64: encode/decode at batch 64, train at 32
    python -m bench.vqvae --config emoji32 --iters 20

Prints one JSON line per measurement ({"bench": "vqvae", "config", "op", "batch",
"images_per_s", ...}), then a table. Each figure is the median over `--iters` timed calls after
`--warmup` untimed ones (compile). Weights are freshly initialised: throughput does not depend
on them. Other sessions share this machine's cores, so the float32 matmul peak
(`bench.common.MatmulPeak`) is read before and after each timing and reported beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Run as `python bench/vqvae.py` (rather than `-m bench.vqvae`), this file's folder would come
# first on sys.path and this file's name would shadow the `vqvae` package: use the repo root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [
    os.path.dirname(_HERE) if os.path.abspath(p or os.curdir) == _HERE else p for p in sys.path
]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import MatmulPeak, emit, print_table  # noqa: E402
from vqvae.config import get_config  # noqa: E402
from vqvae.model import create_model, decode, encode  # noqa: E402
from vqvae.train_config import get_train_config  # noqa: E402
from vqvae.train_step import create_optimizer, make_train_step  # noqa: E402


def _time(fn, iters: int, warmup: int, peak: MatmulPeak) -> tuple[float, float]:
    """(median seconds per call of `fn()`, mean matmul peak GFLOP/s read before and after).

    `fn` must block until its result is ready.
    """
    for _ in range(warmup):
        fn()
    before = peak()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), (before + peak()) / 2


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
    common = {"bench": "vqvae", "config": config_name, "device": jax.devices()[0].device_kind}
    peak = MatmulPeak()
    results = []
    encode_once = lambda: encode_fn(state, images).block_until_ready()
    seconds, gflops = _time(encode_once, iters, warmup, peak)
    results.append(
        {
            **common,
            "op": "encode",
            "batch": batch,
            "images_per_s": batch / seconds,
            "peak_gflops": gflops,
        }
    )
    decode_once = lambda: decode_fn(state, ids).block_until_ready()
    seconds, gflops = _time(decode_once, iters, warmup, peak)
    results.append(
        {
            **common,
            "op": "decode",
            "batch": batch,
            "images_per_s": batch / seconds,
            "peak_gflops": gflops,
        }
    )

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

        seconds, gflops = _time(one_step, iters, warmup, peak)
        results.append(
            {
                **common,
                "op": "train_step",
                "batch": train_batch,
                "images_per_s": train_batch / seconds,
                "steps_per_s": 1.0 / seconds,
                "peak_gflops": gflops,
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
        emit(r)
    print_table(
        results,
        ["config", "op", "batch", "images_per_s", "steps_per_s", "peak_gflops", "device"],
        title="vqvae throughput (median; peak_gflops: float32 matmul peak read around it)",
    )


if __name__ == "__main__":
    main()
