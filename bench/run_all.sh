#!/usr/bin/env bash
# Every benchmark in one call, inside a time budget, with a report however it ends: bench/run_all.sh --help.
# On a GPU machine: bench/run_all.sh --out OUT.   On a CPU: bench/run_all.sh --dry-run --out DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/run_all.py "$@"
