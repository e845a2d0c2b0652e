"""Training throughput and model FLOPs utilisation of the stage-2 transformer on this machine.

    python bench/train_step.py --config ref-small --batch 16 --steps 5 --rounds 5

Other sessions share this machine's cores, so the float32 matmul peak is measured in the same run,
interleaved with the train steps: each round times one jitted loop of 2048x2048 float32 matmuls,
then `--steps` train steps, then the matmul loop again; the round's MFU is its model GFLOP/s
over the mean of the two peak readings, and the reported figure is the median over rounds.

Model FLOPs (per token, training = 3x forward, multiply-add = 2 FLOPs):
    6 * (L * (4 d^2 + 2 d f) + (T d V_text + N d V_image) / S) + 12 * L * d * S
i.e. 6 x the matmul parameters each token passes through (qkv, out, 2 MLP matrices per layer; the
text head on the T text positions and the image head on the N image positions) plus attention
scores and values over the full S x S square (12 L d S). Embedding lookups, norms, softmax and
the optimizer count nothing, nor does the MLP activation (`ReLU` by default, `--set
activation=gelu` for GELU, whose tanh passes cost 11-16% of a `ref-small` step on a 2-core CPU).

On a GPU or TPU the peak is the accelerator's bfloat16 rate instead (a loop of 8192x8192
bfloat16 matmuls; `--peak-dtype/--peak-size/--peak-reps` change it), the rate a bf16 training
run is held to; run the configs there with `--dtype bfloat16`:

    python -m bench.train_step --dtype bfloat16 --config ref-base --config 350m --batch 32

Prints one JSON line per config and a table.

Meshes (`--mesh D,F,T`, repeatable, or several after one flag): the same global batch, the same
initial weights and the same data run on each (data, fsdp, tensor) mesh and on one device,
interleaved round by round; each mesh's `step_time_ratio` is its step time over the one-device
step time of the same round (median over rounds), so > 1 means slower than one device.
`--devices N` fakes N CPU devices (XLA_FLAGS, set before jax is imported):

    python bench/train_step.py --devices 8 --config tiny --batch 16 --mesh 8,1,1 2,2,2 1,4,2

On a CPU the fake devices share the same cores, so the ratio measures the partitioning's
overhead (collectives, smaller kernels), not a speedup; and MFU is not reported in this mode,
because one fake device's share of the cores is not the matmul peak of the whole CPU. The
baseline is one device of the same (faked) platform: XLA runs a one-device program differently
when it fakes several devices, so compare only within one run. The final loss of every mesh
should agree with the one-device run's (to float tolerance): a check that they trained alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", action="append", help="model config name (repeatable); default ref-small"
    )
    p.add_argument("--batch", type=int, action="append", help="batch size per config (repeatable)")
    p.add_argument("--steps", type=int, default=5, help="timed train steps per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved peak/train rounds")
    p.add_argument("--dtype", default=None, help="override the compute dtype (float32, bfloat16)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a model config field (JSON or a bare string), e.g. --set norm=layernorm",
    )
    p.add_argument(
        "--peak-reps",
        type=int,
        default=None,
        help="matmuls per peak reading (default 4 on CPU, 16 on a GPU/TPU)",
    )
    p.add_argument(
        "--peak-size",
        type=int,
        default=None,
        help="side n of the [n, n] peak matmuls (default 2048 on CPU, 8192 on a GPU/TPU)",
    )
    p.add_argument(
        "--peak-dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="dtype of the peak matmuls (default float32 on CPU; bfloat16 on a GPU/TPU, the "
        "rate bf16 training is held to)",
    )
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS (set before jax is imported)")
    p.add_argument(
        "--mesh",
        action="append",
        nargs="+",
        default=None,
        metavar="D,F,T",
        help="time the train step on these data,fsdp,tensor meshes against one device (repeatable)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="fake this many CPU devices (--xla_force_host_platform_device_count)",
    )
    args = p.parse_args(argv)
    args.meshes = parse_meshes(args.mesh)
    if args.devices is not None and args.devices < 1:
        p.error(f"--devices must be at least 1, got {args.devices}")
    return args


def parse_meshes(groups: list[list[str]] | None) -> list[tuple[int, int, int]]:
    """`[["8,1,1", "2,2,2"], ["1,4,2"]]` (from `--mesh`) -> [(8, 1, 1), (2, 2, 2), (1, 4, 2)].

    Each mesh is three positive sizes data,fsdp,tensor; `;` also separates meshes in one word.
    Raises `SystemExit` (via argparse's message style) on anything else.
    """
    meshes = []
    for text in (word for group in groups or [] for item in group for word in item.split(";")):
        try:
            sizes = tuple(int(s) for s in text.split(","))
        except ValueError:
            sizes = ()
        if len(sizes) != 3 or any(s < 1 for s in sizes):
            raise SystemExit(f"error: --mesh {text!r}: give three positive sizes D,F,T, e.g. 2,2,2")
        if sizes not in meshes:
            meshes.append(sizes)
    return meshes


def model_flops_per_token(c) -> float:
    """Training FLOPs per token; see the module docstring."""
    layer = 4 * c.d_model**2 + 2 * c.d_model * c.mlp_dim
    heads = (
        c.text_length * c.d_model * c.text_vocab_size
        + c.image_length * c.d_model * c.image_vocab_size
    ) / c.seq_length
    return 6 * (c.num_layers * layer + heads) + 12 * c.num_layers * c.d_model * c.seq_length


def main(argv=None) -> int:
    args = parse_args(argv)
    flags = args.xla_flags
    if args.devices is not None:
        flags += f" --xla_force_host_platform_device_count={args.devices}"
    if flags.strip():
        if "jax" in sys.modules:
            print("warning: jax is already imported; --devices/--xla-flags may not apply")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    if args.meshes:
        return mesh_main(args)

    import jax
    from flax import nnx

    if not __package__:  # run as `python bench/train_step.py`: make `bench` importable
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.common import MatmulPeak
    from dalle_jax.model import DalleTransformer, get_config
    from dalle_jax.train_step import OptimConfig, init_train_state, make_train_step

    on_cpu = jax.devices()[0].platform == "cpu"
    matmul_peak = MatmulPeak(
        n=args.peak_size or (2048 if on_cpu else 8192),
        reps=args.peak_reps or (4 if on_cpu else 16),
        dtype=args.peak_dtype or ("float32" if on_cpu else "bfloat16"),
    )

    def peak_gflops() -> tuple[float, float]:
        """(GFLOP per wall second, GFLOP per CPU second of this process) of the matmul loop."""
        matmul_peak()
        return matmul_peak.readings[-1], matmul_peak.cpu_readings[-1]

    configs = args.config or ["ref-small"]
    batches = args.batch or [16]
    if len(batches) == 1:
        batches = batches * len(configs)
    if len(batches) != len(configs):
        print("error: give one --batch, or one per --config", file=sys.stderr)
        return 2
    rows = []
    for name, batch in zip(configs, batches, strict=True):
        overrides = _overrides(args)
        config = get_config(name, **overrides)
        model = DalleTransformer(config, rngs=nnx.Rngs(0))
        optim = OptimConfig(warmup_steps=10, total_steps=1000)
        graphdef, state = init_train_state(model, optim)
        del model
        train_step = make_train_step(graphdef, optim)
        keys = jax.random.split(jax.random.key(1), 2)
        data = {
            "text_ids": jax.random.randint(
                keys[0], (batch, config.text_length), 0, config.text_vocab_size
            ),
            "image_ids": jax.random.randint(
                keys[1], (batch, config.image_length), 0, config.image_vocab_size
            ),
        }
        t0 = time.perf_counter()
        state, metrics = train_step(state, data)
        jax.block_until_ready((state, metrics))
        compile_s = time.perf_counter() - t0
        flops_step = model_flops_per_token(config) * batch * config.seq_length
        ratios, cpu_ratios, tokens, peaks = [], [], [], []
        for _ in range(args.rounds):
            before = peak_gflops()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                state, metrics = train_step(state, data)
            jax.block_until_ready((state, metrics))
            step_s = (time.perf_counter() - t0) / args.steps
            step_cpu_s = (time.process_time() - c0) / args.steps
            after = peak_gflops()
            peak = (before[0] + after[0]) / 2
            peak_per_cpu_s = (before[1] + after[1]) / 2
            peaks.append(peak)
            ratios.append(flops_step / step_s / 1e9 / peak)
            cpu_ratios.append(flops_step / step_cpu_s / 1e9 / peak_per_cpu_s)
            tokens.append(batch * config.seq_length / step_s)
        row = {
            "bench": "train_step",
            "config": name,
            "batch": batch,
            "dtype": config.dtype,
            "activation": config.activation,
            "tokens_per_s": round(statistics.median(tokens), 1),
            "mfu": round(statistics.median(ratios), 4),
            "mfu_min": round(min(ratios), 4),
            "mfu_max": round(max(ratios), 4),
            # The same ratio per CPU-second this process used: insensitive to how many cores the
            # other sessions left us, blind to idle time within a step.
            "mfu_cpu_time": round(statistics.median(cpu_ratios), 4),
            "peak_gflops": round(statistics.median(peaks), 1),
            "peak_dtype": matmul_peak.dtype,
            "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind,
            "model_gflops": round(statistics.median(ratios) * statistics.median(peaks), 1),
            "gflop_per_step": round(flops_step / 1e9, 2),
            "compile_s": round(compile_s, 1),
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "final_loss": round(float(metrics["loss"]), 4),
            "overrides": overrides,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    header = (
        f"{'config':<10} {'batch':>5} {'tokens/s':>9} {'MFU':>6} {'(min-max)':>13} "
        f"{'MFU/cpu-s':>9} {'peak GF/s':>9} {'compile s':>9}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['config']:<10} {r['batch']:>5} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} "
            f"{r['mfu_min']:>6.1%}-{r['mfu_max']:<6.1%} {r['mfu_cpu_time']:>9.1%} "
            f"{r['peak_gflops']:>9.1f} {r['compile_s']:>9.1f}"
        )
    return 0


def _overrides(args) -> dict:
    overrides = {"dtype": args.dtype} if args.dtype else {}
    for item in args.set:
        field, _, value = item.partition("=")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value  # a bare string: --set norm=rmsnorm
    return overrides


def mesh_main(args) -> int:
    """`--mesh` mode: per config, the step time of each mesh against one device; see the
    module docstring. Prints one JSON line per (config, mesh) and a table."""
    import jax
    import numpy as np
    from flax import nnx

    if not __package__:  # run as `python bench/train_step.py`: make `bench` importable
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.common import emit, print_table
    from dalle_jax.errors import UserError
    from dalle_jax.model import DalleTransformer, get_config
    from dalle_jax.sharding import (
        DEFAULT_RULES,
        MeshConfig,
        make_mesh,
        param_shardings,
        shard_batch,
        use_rules,
    )
    from dalle_jax.train_step import OptimConfig, init_train_state, make_train_step

    configs = args.config or ["ref-small"]
    batches = args.batch or [16]
    if len(batches) == 1:
        batches = batches * len(configs)
    if len(batches) != len(configs):
        print("error: give one --batch, or one per --config", file=sys.stderr)
        return 2
    devices = jax.devices()
    meshes = [(1, 1, 1), *(m for m in args.meshes if m != (1, 1, 1))]
    for sizes in meshes:
        needed = int(np.prod(sizes))
        if needed > len(devices):
            print(
                f"error: mesh {','.join(map(str, sizes))} needs {needed} devices but "
                f"{len(devices)} are available; pass --devices {needed} (fake CPU devices)",
                file=sys.stderr,
            )
            return 2
    rules = DEFAULT_RULES
    rows = []
    for name, batch in zip(configs, batches, strict=True):
        overrides = _overrides(args)
        config = get_config(name, **overrides)
        optim = OptimConfig(warmup_steps=10, total_steps=1000)
        graphdef = init_train_state(
            nnx.eval_shape(lambda config=config: DalleTransformer(config, rngs=nnx.Rngs(0))), optim
        )[0]

        def fresh_state(config=config, optim=optim):
            return init_train_state(DalleTransformer(config, rngs=nnx.Rngs(0)), optim)[1]

        abstract = nnx.eval_shape(fresh_state)
        rng = np.random.default_rng(1)
        data = {
            "text_ids": rng.integers(0, config.text_vocab_size, (batch, config.text_length)),
            "image_ids": rng.integers(0, config.image_vocab_size, (batch, config.image_length)),
        }
        data = {k: v.astype(np.int32) for k, v in data.items()}
        runs = []
        try:
            for sizes in meshes:
                mesh = make_mesh(MeshConfig(*sizes), devices=devices[: int(np.prod(sizes))])
                shardings = param_shardings(abstract, mesh, rules)
                # It runs once: on CPU, LLVM's optimisations of the random-number kernels cost
                # more compile time than they save (as in dalle_jax.training.compiled_init).
                on_cpu = devices[0].platform == "cpu"
                options = {"xla_backend_optimization_level": 0} if on_cpu else None
                with jax.set_mesh(mesh), use_rules(rules):
                    init = jax.jit(fresh_state, out_shardings=shardings, compiler_options=options)
                    state = init()
                step = make_train_step(graphdef, optim, state=abstract, mesh=mesh, rules=rules)
                placed = shard_batch(data, mesh, rules)
                t0 = time.perf_counter()
                state, metrics = step(state, placed)
                jax.block_until_ready((state, metrics))
                runs.append(
                    {
                        "sizes": sizes,
                        "step": step,
                        "state": state,
                        "batch": placed,
                        "metrics": metrics,
                        "compile_s": time.perf_counter() - t0,
                        "step_s": [],
                    }
                )
        except (UserError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for _ in range(args.rounds):
            for run in runs:
                t0 = time.perf_counter()
                state, metrics = run["state"], run["metrics"]
                for _ in range(args.steps):
                    state, metrics = run["step"](state, run["batch"])
                jax.block_until_ready((state, metrics))
                run["step_s"].append((time.perf_counter() - t0) / args.steps)
                run["state"], run["metrics"] = state, metrics
        baseline = runs[0]["step_s"]
        for run in runs:
            ratios = [s / b for s, b in zip(run["step_s"], baseline, strict=True)]
            step_s = statistics.median(run["step_s"])
            sizes = run["sizes"]
            row = {
                "bench": "train_step_mesh",
                "config": name,
                "mesh": "x".join(map(str, sizes)),
                "devices": int(np.prod(sizes)),
                "batch": batch,
                "dtype": config.dtype,
                "step_ms": round(step_s * 1e3, 2),
                "step_ms_min": round(min(run["step_s"]) * 1e3, 2),
                "step_ms_max": round(max(run["step_s"]) * 1e3, 2),
                "tokens_per_s": round(batch * config.seq_length / step_s, 1),
                "step_time_ratio": round(statistics.median(ratios), 3),
                "step_time_ratio_min": round(min(ratios), 3),
                "step_time_ratio_max": round(max(ratios), 3),
                "compile_s": round(run["compile_s"], 1),
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "final_loss": round(float(run["metrics"]["loss"]), 5),
                "overrides": overrides,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
            }
            rows.append(row)
            emit(row)
    table = [
        {
            "config": r["config"],
            "mesh": r["mesh"],
            "devices": r["devices"],
            "batch": r["batch"],
            "step ms": r["step_ms"],
            "tokens/s": r["tokens_per_s"],
            "time / 1 device": r["step_time_ratio"],
            "ratio min": r["step_time_ratio_min"],
            "ratio max": r["step_time_ratio_max"],
            "compile s": r["compile_s"],
            "final loss": r["final_loss"],
        }
        for r in rows
    ]
    print_table(table, title="train step per mesh, same global batch (ratio: mesh / 1 device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
