#!/usr/bin/env bash
# One run on a CUDA machine gives every GPU figure: the `cuda`-marked tests, then the reading, extraction
# and training benchmarks with --device cuda, their JSON lines collected into one file. Under 8 minutes on
# one H100/H200-class GPU: quick settings, and each step has its own time limit (120 + 100 + 160 + 90 s =
# 470 s at most) so one stall cannot eat the rest; a step cut off reports rc 124 and the others still run.
#   bash benchmarks/gpu_check.sh [OUT.json]      (default: benchmarks/out/gpu_check.json)
# The slides come from $SLPD_TEST_SLIDES (default ../shared/data/slides next to the repository).
set -u
cd "$(dirname "$0")/.." || exit 2
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
  local file=benchmarks/out/gpu_check_$name.txt start=$SECONDS rc json
  timeout "$limit" "$@" > "$file" 2>&1; rc=$?
  echo "== $name rc=$rc $((SECONDS - start)) s" | tee -a "$LOG" >&2; tail -5 "$file" >> "$LOG"
  json=$(last_json "$file")
  # no JSON line (pytest, or a step cut off): its last line as a JSON string, e.g. "3 passed in 41.2s";
  # a JSON line that does not parse (cut off mid-print) is kept as a string too: the file stays valid JSON
  json=$("$PY" -c 'import json, sys
try:
    json.loads(sys.argv[1]); print(sys.argv[1])
except ValueError:
    print(json.dumps(sys.argv[1]))' "${json:-$(tail -1 "$file")}")
  printf '"%s": {"rc": %d, "seconds": %d, "result": %s}' "$name" "$rc" $((SECONDS - start)) "$json"
}

{
  echo "{"
  step cuda_tests 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/; echo ","
  step read_regions 100 "$PY" benchmarks/read_regions.py --quick --device cuda; echo ","
  step extract 160 "$PY" benchmarks/extract.py --quick --skip-rss --skip-compute-bound --device cuda --cuda-side 16384; echo ","
  step train 90 "$PY" benchmarks/train.py --quick --device cuda
  echo "}"
} > "$OUT"
echo "wrote $OUT (log: $LOG)"
