#!/usr/bin/env bash
# The GPU check of issue 16, on one H100/H200, in under 8 minutes (each step has its own timeout):
#   1. install: wheels in .whl/ if staged (../shared/tools/device-wheels.sh), then the harness and its
#      plugins from this checkout (pip --no-index --no-build-isolation --target), offline;
#   2. harness plan of bench/gpu_check.toml for the device (plan.txt);
#   3. bench/factorize.py (4 layers of full 7B shapes) and bench/decode.py (full 7B shapes, fp16);
#   4. bench/gpu_check.py: random Llama-2-7B shape, all 32 blocks, bf16, svd-llm keep 0.8 end to end
#      (calibration 32 x 2048, factorization, perplexity on 4 windows of 2048), peak GPU memory per stage
#      against the plan (gpu-check.json; gpu-check.progress.json holds the stages reached if it times out).
# Everything lands under $OUT (the device tool's; default /tmp/gpu-check): gpu-check.log, plan.txt,
# nvidia-smi.txt, factorize.json, decode.json, gpu-check.json, gpu-check.progress.json.
#
# Before the device call, here: bash bench/gpu_stage.sh (stages .gpu/); the call carries ".gpu" (and
# ".whl" if staged) and runs: bash bench/gpu_check.sh
# CPU test of this script (1 block, widths / 8, cpu, small decode): GPU_CHECK_CPU=1 bash bench/gpu_check.sh
# Overrides: GPU_CHECK_LAYERS (blocks, default 32), PYTHON (default python3), GPU_CHECK_SITE (/tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
if [ ! -d .gpu/site ]; then echo "no .gpu/: run bench/gpu_stage.sh first and carry .gpu" >&2; exit 2; fi
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  DEVICE=cpu; LAYERS=${GPU_CHECK_LAYERS:-1}; SCALE=8
  FACTORIZE=(--layers 1 --scale 8 --threads 1 --device cpu)
  DECODE=(--layers 1 --scale 8 --vocab 4000 --new-tokens 8 --prompt-len 32 --min-seconds 1 --min-runs 2 --warmup 1 --threads 1 --device cpu)
  THREADS=(--threads 1)
else
  DEVICE=cuda; LAYERS=${GPU_CHECK_LAYERS:-32}; SCALE=1
  FACTORIZE=(--layers 4 --device cuda)
  DECODE=(--device cuda --min-seconds 2)
  THREADS=()
fi
MODEL="random:llama-2-7b?layers=$LAYERS"; [ "$SCALE" = 1 ] || MODEL="$MODEL&scale=$SCALE"
step() { echo "== $1 ($(date +%T))"; }
{
  step install
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 3
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" . plugins/harness_* || exit 3
  export PYTHONPATH="$PWD/.gpu/site:$SITE" HARNESS_CACHE="$PWD/.gpu/cache" PYTHONUNBUFFERED=1
  command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  "$PY" -c "import torch, transformers, harness; print('torch', torch.__version__, 'transformers', transformers.__version__, 'harness', harness.__file__, 'cuda', torch.cuda.is_available())"
  step plan
  timeout 60 "$PY" -m harness.cli plan bench/gpu_check.toml --model "$MODEL" --device "$DEVICE" | tee "$OUT/plan.txt"
  step factorize
  timeout 75 "$PY" bench/factorize.py "${FACTORIZE[@]}" --json "$OUT/factorize.json" || echo "factorize: exit $?"
  step decode
  timeout 75 "$PY" bench/decode.py "${DECODE[@]}" --json "$OUT/decode.json" || echo "decode: exit $?"
  step "svd-llm end to end"
  timeout 300 "$PY" bench/gpu_check.py --layers "$LAYERS" --scale "$SCALE" --device "$DEVICE" "${THREADS[@]}" \
    --json "$OUT/gpu-check.json" || echo "gpu_check: exit $? (stages reached: gpu-check.progress.json)"
  step done
} 2>&1 | tee "$OUT/gpu-check.log"
