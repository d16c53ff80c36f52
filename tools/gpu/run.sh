#!/usr/bin/env bash
# One command for a lent single-GPU machine (tools/gpu/README.md):  bash tools/gpu/run.sh [single_gpu.py options]
# Installs the carried wheels (.whl/, made by tools/gpu/fetch_wheels.sh) when deepspeed is missing, then runs
# tools/gpu/single_gpu.py with its output and a log in $OUT (default runs-out/gpu).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/runs-out/gpu}
mkdir -p "$OUT"
LOG="$OUT/single_gpu.log"
{
  echo "== $(date -u +%FT%TZ) $(hostname) python: $($PY -V 2>&1)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
} | tee "$LOG"
if ! $PY -c 'import importlib.util as u, sys; sys.exit(u.find_spec("deepspeed") is None)'; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "deepspeed missing and no .whl/: run tools/gpu/fetch_wheels.sh first" | tee -a "$LOG"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$LOG" || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
$PY tools/gpu/single_gpu.py --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "== exit status $rc" | tee -a "$LOG"
exit "$rc"
