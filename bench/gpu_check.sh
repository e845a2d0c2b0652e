#!/bin/bash
# The transformer's GPU check (issue #4), made to run as one call on a lent GPU machine:
#   bash bench/gpu_check.sh            (writes logs under $OUT, or /tmp/gpu_check)
# Training throughput and MFU of `ref-base` and the ~350M-parameter `350m` in bfloat16, against the
# card's bfloat16 matmul rate measured in the same run (bench/train_step.py). The image's own jax
# and flax are tried first; if a tiny smoke run fails with them and wheels of the tested flax/optax
# were carried in .whl/, those are installed and the smoke run repeated.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv |
  tee "$OUT/gpu.txt"
versions='import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
$PY -c "$versions" 2>&1 | tail -1
if ! $PY -m bench.train_step --config tiny --steps 2 --rounds 1 >"$OUT/smoke.log" 2>&1; then
  tail -15 "$OUT/smoke.log"
  if [ -d .whl ]; then
    echo "== smoke run failed with the image's packages; installing the carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    $PY -c "$versions" 2>&1 | tail -1
    $PY -m bench.train_step --config tiny --steps 2 --rounds 1 >"$OUT/smoke.log" 2>&1 ||
      { tail -15 "$OUT/smoke.log"; exit 1; }
  else
    exit 1
  fi
fi
tail -1 "$OUT/smoke.log"
steps=${STEPS:-10}
rounds=${ROUNDS:-5}
bench() { # LOG_NAME ARGS...: one bench/train_step.py run in bfloat16, JSON kept, table shown
  local name=$1
  shift
  $PY -m bench.train_step --dtype bfloat16 --steps "$steps" --rounds "$rounds" "$@" 2>&1 |
    tee "$OUT/$name.log" | grep -v '^{'
}
for section in ${SECTIONS:-xla cudnn}; do
  case $section in
  xla)
    # As configured (350m: remat on, the pod setting) and at the batch for ref-base,
    # then larger batches that fill the card.
    bench xla --config ref-base --batch 8 --config ref-base --batch 64 --config 350m --batch 32
    # Without remat: the model FLOPs stay the same, the recomputed forward pass goes away.
    bench xla_noremat --set remat=false --config 350m --batch 32 --config 350m --batch 64
    ;;
  cudnn)
    # The fused cuDNN attention against the einsum attention, in the same call.
    bench xla_base --set remat=false --config ref-base --batch 64 --config 350m --batch 64
    bench cudnn_noremat --set remat=false --set attention_impl=cudnn \
      --config ref-base --batch 64 --config 350m --batch 64
    bench cudnn --set attention_impl=cudnn --config 350m --batch 32
    ;;
  esac
done
grep -h '^{' "$OUT"/*.log >"$OUT/train_step.jsonl"
