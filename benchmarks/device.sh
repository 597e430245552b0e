#!/usr/bin/env bash
# One command on a GPU machine: BLIP-base and BLIP-large (random weights, full size, fp16):
# bare generate at the best batch size, the model card's loop, blipq with 1..15 intake processes,
# GPU memory. At most 8 minutes (BUDGET_S, default 420 s for the benchmark itself).
#
#   bash benchmarks/device.sh                      # on the GPU machine; report in $OUT or ./device-report
#   DEVICE=cpu TINY=1 bash benchmarks/device.sh    # the same steps on a CPU with the tests' tiny BLIP
#
# Needs python3 with torch, transformers, pillow, numpy. The blipq part also needs celery, kombu,
# redis, boto3, pydantic-settings and a Redis and an S3 server program: wheels in ./.whl
# (see docs/performance.md, "On a GPU") are installed into a private folder first, when present;
# when something is still missing the report says what, and the other parts run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-./device-report}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/blipq-site .whl/*.whl
    export PYTHONPATH="/tmp/blipq-site:${PYTHONPATH:-}"
    export PATH="/tmp/blipq-site/bin:$PATH"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export BLIPQ_BENCH_CACHE="${BLIPQ_BENCH_CACHE:-/tmp/blipq-bench}"
ARGS=(--device "${DEVICE:-cuda}" --budget-s "${BUDGET_S:-420}" --json "$OUT_DIR/device.json")
if [ "${TINY:-0}" = 1 ]; then
    ARGS+=(--tiny --images 8 --seed-images 4 --jobs 64 --batch-sizes 1,4 --worker-batch 4
           --intake-processes 1,2 --max-new-tokens 4 --static-s3)
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$OUT_DIR/gpu.csv" 2>/dev/null || true
timeout 470 "$PY" -m benchmarks.device "${ARGS[@]}" "$@" 2>&1 | tee "$OUT_DIR/device.log"
