#!/usr/bin/env bash
# Create .venv and install cola-batch with its dev extras.
# torch is pinned to the CPU wheel first: without the pin pip pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -c constraints-cpu.txt 'torch==2.13.0+cpu' \
  || .venv/bin/pip install -q 'torch==2.13.0'
.venv/bin/pip install -q -c constraints-cpu.txt -e '.[dev]'
echo "installed: $(.venv/bin/cola-batch version)"
