#!/bin/sh
# Install dynaflow-tune into the current Python; `--dev` adds the test and notebook tools.
# Where no torch is installed yet, the CPU wheel is installed first, so the install never
# pulls a multi-GB CUDA build. Set TORCH_SPEC to choose another torch (e.g. a CUDA build).
set -e
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ "$1" = "--dev" ]; then
    "$PY" -m pip install --quiet -e ".[dev]"
else
    "$PY" -m pip install --quiet -e .
fi
