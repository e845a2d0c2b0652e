"""Sampling speed: image tokens/s with the KV cache and with the naive full-recompute baseline.

    python -m bench.sample                                   # ref-small and ref-base, batch 1/8/32
    python -m bench.sample --config ref-small --batch 8 --no-naive

Weights are random (speed does not depend on their values). For each config and batch size:

cached   `generate_image_ids` on the preallocated KV cache: all N image ids, timed `--repeats`
         times (median). Its per-token step time is (t(N ids) - t(1 id)) / (N - 1), so the
         prefill is not counted in it.
naive    `generate_image_ids_naive`: the teacher-forced forward over all S positions for every
         token. Its cost per token does not depend on the position (fixed shapes), so it is
         timed on the first `--naive-tokens` ids only (0 = all), once.

Image tokens/s = batch * ids drawn / seconds (the cached figure includes the prefill; median of
the repeats, and the best one);
first_call_s is the first call: compile plus one run.
Step time is compared with the time its matmul FLOPs take at the float32 matmul peak measured
in the same run (`bench.common.MatmulPeak`: the mean of readings just before and after each
timing, as the shared machine's peak drifts). Matmul FLOPs, multiply-add = 2:
    cached step, per row:  2 (L (4 d^2 + 2 d f) + d V_image) + 4 L d C   (attention over the
                           C-slot cache, masked; C is S with one decoding segment, else the
                           mean over the steps of their segment's cache length)
    naive step, per row:   2 (S L (4 d^2 + 2 d f) + T d V_text + N d V_image) + 4 L d S^2

Prints one JSON line per measurement ({"bench": "sample", "config", "batch", "cache",
"image_tokens_per_s", ...}), then a table and the speed-ups with the targets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.common import MatmulPeak, emit, print_table

DEFAULT_CONFIGS = ("ref-small", "ref-base")
DEFAULT_BATCHES = (1, 8, 32)
# DALLE-pytorch on this machine, ref-small batch 8: ~115 image tokens/s without a cache, ~500
# with one patched in. The targets are 40x and 10x those.
TARGET_TOKENS_PER_S = {"ref-small": max(40 * 115, 10 * 500)}
TARGET_SPEEDUP = 10.0  # cached over naive, at N = 256 image tokens (ref-base)
TARGET_STEP_OVER_MATMUL = 3.0  # at batch 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--config",
        action="append",
        help=f"model config (repeatable); default {', '.join(DEFAULT_CONFIGS)}",
    )
    p.add_argument(
        "--batch",
        type=int,
        action="append",
        help=f"batch size (repeatable); default {DEFAULT_BATCHES}",
    )
    p.add_argument(
        "--naive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the no-cache baseline",
    )
    p.add_argument(
        "--naive-tokens",
        type=int,
        default=8,
        help="image ids the naive baseline draws per timing (0 = all)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the cached sampler")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="guidance scale; != 1 doubles the rows the model runs",
    )
    p.add_argument(
        "--segments",
        type=int,
        default=0,
        help="scans the cached decoding runs as (0 = the sampler's default for the config)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def layer_flops(c) -> int:
    """Matmul multiply-adds of one position through the blocks' projections and MLPs."""
    return c.num_layers * (4 * c.d_model**2 + 2 * c.d_model * c.mlp_dim)


def mean_cache_length(c, segments: int) -> float:
    """The cache length attention reads, averaged over the N-1 decode steps."""
    from dalle_jax.sampling import segment_bounds

    steps = c.image_length - 1
    # A segment ending at step index `last` runs on a cache of T + 2 + last positions.
    total = sum(
        (stop - begin) * (c.text_length + 1 + stop)
        for begin, stop in segment_bounds(steps, segments)
    )
    return total / steps


def cached_step_flops(c, segments: int = 1) -> float:
    """Matmul FLOPs of one cached decode step for one row (mean over the steps)."""
    return 2 * (
        layer_flops(c) + c.d_model * c.image_vocab_size
    ) + 4 * c.num_layers * c.d_model * mean_cache_length(c, segments)


def naive_step_flops(c) -> int:
    """Matmul FLOPs of one teacher-forced forward pass (one naive step) for one row."""
    s = c.seq_length
    heads = (
        c.text_length * c.d_model * c.text_vocab_size
        + c.image_length * c.d_model * c.image_vocab_size
    )
    return 2 * (s * layer_flops(c) + heads) + 4 * c.num_layers * c.d_model * s * s


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args).block_until_ready()
    return time.perf_counter() - start


def bench_config(name: str, batches, args, peak: MatmulPeak) -> list[dict]:
    import jax
    from flax import nnx

    from dalle_jax.model import DalleTransformer, get_config
    from dalle_jax.sampling import SamplingSettings, decode_segments, jit_sampler

    config = get_config(name)
    segments = args.segments or decode_segments(config)
    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, args.cfg_scale)
    rows_per_sample = 2 if settings.cfg_scale != 1.0 else 1
    start = time.perf_counter()
    # Initialised under jit: eager init runs hundreds of tiny ops one by one.
    model = nnx.jit(lambda: DalleTransformer(config, rngs=nnx.Rngs(args.seed)))()
    jax.block_until_ready(nnx.state(model))  # else the init runs during the peak reading
    init_s = time.perf_counter() - start
    n = config.image_length
    records = []
    for batch in batches:
        text_ids = jax.random.randint(
            jax.random.key(args.seed + 1), (batch, config.text_length), 0, config.text_vocab_size
        )
        keys = jax.random.split(jax.random.key(args.seed + 2), batch)
        common = {"bench": "sample", "config": name, "batch": batch, "init_s": init_s}

        full = jit_sampler(model, settings, segments=segments)
        first = jit_sampler(model, settings, num_tokens=1, segments=segments)
        first_call_s = timed(full, text_ids, keys)
        timed(first, text_ids, keys)
        peak_before = peak()
        full_times = [timed(full, text_ids, keys) for _ in range(args.repeats)]
        full_s = statistics.median(full_times)
        prefill_s = statistics.median(timed(first, text_ids, keys) for _ in range(args.repeats))
        peak_after = peak()
        record = {
            **common,
            "cache": True,
            "segments": segments,
            "image_tokens_per_s": batch * n / full_s,
            # The fastest of the repeats: what the machine does when the neighbours are quiet.
            "best_image_tokens_per_s": batch * n / min(full_times),
            "tokens_timed": n,
            "seconds": full_s,
            "prefill_ms": 1e3 * prefill_s,
            "step_ms": 1e3 * max(full_s - prefill_s, 0.0) / (n - 1),
            "step_gflop": cached_step_flops(config, segments) * batch * rows_per_sample / 1e9,
            "first_call_s": first_call_s,
        }
        records.append(against_peak(record, peak_before, peak_after))
        emit(records[-1])

        if args.naive:
            k = min(args.naive_tokens or n, n)
            naive = jit_sampler(model, settings, naive=True, num_tokens=k)
            first_call_s = timed(naive, text_ids, keys)
            peak_before = peak()
            naive_s = timed(naive, text_ids, keys)
            peak_after = peak()
            record = {
                **common,
                "cache": False,
                "image_tokens_per_s": batch * k / naive_s,
                "tokens_timed": k,
                "seconds": naive_s,
                "step_ms": 1e3 * naive_s / k,
                "step_gflop": naive_step_flops(config) * batch * rows_per_sample / 1e9,
                "first_call_s": first_call_s,
            }
            records.append(against_peak(record, peak_before, peak_after))
            emit(records[-1])
    return records


def against_peak(record: dict, peak_before: float, peak_after: float) -> dict:
    """Adds the step's matmul time at the peak read just before and after it was timed (the
    machine is shared, so the peak drifts) and the ratio of the measured step time to it."""
    peak = (peak_before + peak_after) / 2
    matmul_ms = 1e3 * record["step_gflop"] / peak
    return {
        **record,
        "matmul_ms_at_peak": matmul_ms,
        "step_over_matmul": record["step_ms"] / matmul_ms,
        "peak_gflops": peak,
        "peak_gflops_before": peak_before,
        "peak_gflops_after": peak_after,
    }


def summary(records: list[dict]) -> list[dict]:
    """Speed-ups and target checks per (config, batch)."""
    out = []
    by_key = {(r["config"], r["batch"], r["cache"]): r for r in records}
    for (name, batch, cache), cached in by_key.items():
        if not cache:
            continue
        row = {
            "config": name,
            "batch": batch,
            "cached_tokens_per_s": cached["image_tokens_per_s"],
            "best_of_repeats": cached["best_image_tokens_per_s"],
        }
        naive = by_key.get((name, batch, False))
        if naive:
            row["speedup"] = cached["image_tokens_per_s"] / naive["image_tokens_per_s"]
        row["step_over_matmul"] = cached["step_over_matmul"]
        checks = []
        if name in TARGET_TOKENS_PER_S and batch == 8:
            target = TARGET_TOKENS_PER_S[name]
            ok = cached["image_tokens_per_s"] >= target
            checks.append(f"tokens/s >= {target:,}: {'yes' if ok else 'NO'}")
        if naive and cached["tokens_timed"] >= 256:
            ok = row["speedup"] >= TARGET_SPEEDUP
            checks.append(f"speedup >= {TARGET_SPEEDUP:g}x: {'yes' if ok else 'NO'}")
        if batch == 32:
            ok = cached["step_over_matmul"] <= TARGET_STEP_OVER_MATMUL
            checks.append(
                f"step <= {TARGET_STEP_OVER_MATMUL:g}x matmul time: {'yes' if ok else 'NO'}"
            )
        row["targets"] = "; ".join(checks) or "-"
        out.append(row)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    configs = args.config or list(DEFAULT_CONFIGS)
    batches = args.batch or list(DEFAULT_BATCHES)
    peak = MatmulPeak()
    print(
        f"# device: {jax.devices()[0].device_kind}; float32 matmul peak: {peak():.1f} GFLOP/s",
        file=sys.stderr,
        flush=True,
    )
    records = []
    for name in configs:
        records += bench_config(name, batches, args, peak)
    print_table(
        records,
        [
            "config",
            "batch",
            "cache",
            "image_tokens_per_s",
            "best_image_tokens_per_s",
            "tokens_timed",
            "step_ms",
            "matmul_ms_at_peak",
            "step_over_matmul",
            "prefill_ms",
            "first_call_s",
            "peak_gflops",
        ],
        title="sampling speed (random weights; step = one image token for the whole batch)",
    )
    print_table(summary(records), title="cached vs naive, and the targets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
