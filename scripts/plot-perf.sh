#!/usr/bin/env bash
# Renders PNG plots of `magnetar perf produce --histogram-out FILE` runs:
#   scripts/plot-perf.sh OUT_PREFIX LABEL=FILE [LABEL=FILE ...]
# writes OUT_PREFIX-throughput.png (throughput over time) and
# OUT_PREFIX-latency.png (latency percentile curve). Installs matplotlib
# into the project's .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet 'matplotlib>=3.8,<4'
fi
exec .venv/bin/python scripts/plot-perf.py "$@"
