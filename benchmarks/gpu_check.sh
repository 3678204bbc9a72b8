#!/usr/bin/env bash
# One run on a CUDA machine gives every GPU figure: the `cuda`-marked tests, then the reading, extraction
# and training benchmarks with --device cuda, their JSON lines collected into one file. Under 8 minutes on
# one H100/H200-class GPU (quick settings; each step has its own time limit so one stall cannot eat the rest).
#   bash benchmarks/gpu_check.sh [OUT.json]      (default: benchmarks/out/gpu_check.json)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${1:-benchmarks/out/gpu_check.json}
mkdir -p "$(dirname "$OUT")" benchmarks/out
LOG=benchmarks/out/gpu_check.log
: > "$LOG"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || { echo "no CUDA device" >&2; exit 3; }

last_json() { grep -E '^\{' "$1" | tail -1; }
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local file=benchmarks/out/gpu_check_$name.txt start=$SECONDS
  timeout "$limit" "$@" > "$file" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - start)) s" | tee -a "$LOG"; tail -5 "$file" >> "$LOG"
  local json; json=$(last_json "$file"); [ -n "$json" ] || json=null
  printf '"%s": {"rc": %d, "seconds": %d, "result": %s}' "$name" "$rc" $((SECONDS - start)) "$json"
}

{
  echo "{"
  # pytest prints no JSON: its summary line goes into the log, the exit code into the file.
  step cuda_tests 150 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/; echo ","
  step read_regions 90 "$PY" benchmarks/read_regions.py --quick --device cuda; echo ","
  step extract 180 "$PY" benchmarks/extract.py --quick --skip-rss --skip-compute-bound --device cuda --cuda-side 16384; echo ","
  step train 60 "$PY" benchmarks/train.py --quick
  echo "}"
} > "$OUT"
echo "wrote $OUT (log: $LOG)"
