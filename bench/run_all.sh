#!/usr/bin/env bash
# Every benchmark in one go (about 8 minutes on an H100), then the report of the history.
#   bash bench/run_all.sh [OUT_DIR]     # OUT_DIR (default bench/results) receives report.md and the plots
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
export PYTHONUNBUFFERED=1

python bench/rope.py
python bench/attn.py
python bench/loader.py
python bench/train.py --steps 20
python bench/train.py --steps 10 --cases deep,deep-w768 --max-memory-gb 40   # an A100-40GB's budget
python bench/report.py --out "$out"
