#!/bin/sh
# Build, here, the folder of wheels the lent GPU machine lacks (it has no network): optuna and its
# storage stack, and the test kit's hypothesis. Run once; carry the folder with each device call.
#
#   sh scripts/gpu_wheels.sh                 # .whl/ for the lent machine: CPython 3.12, x86-64
#   PY_VERSION=3.11 WHEELS=/tmp/w sh scripts/gpu_wheels.sh   # another Python (scripts/check_gpu_kit.sh)
#
# Versions are the ones installed here (what the test suite passes with), read from this Python.
# The lent machine already has numpy, packaging, tqdm, PyYAML, typing-extensions and MarkupSafe
# (torch's and pandas' own needs), pytest, scipy, pandas, matplotlib, cuda-bindings, nvidia-ml-py.
set -eu
PY="${PYTHON:-python3}"
OUT="${WHEELS:-.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
NAMES="optuna alembic sqlalchemy greenlet mako colorlog hypothesis attrs sortedcontainers"
mkdir -p "$OUT"
pins=$("$PY" - $NAMES <<'PYEOF'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)  # not installed here (greenlet is optional for SQLAlchemy on some builds): newest
PYEOF
)
for pin in $pins; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$OUT" "$pin" || { echo "gpu_wheels: no wheel of $pin for CPython $PY_VERSION x86-64" >&2; exit 1; }
done
count=$(ls "$OUT"/*.whl | wc -l)
size=$(du -sk "$OUT" | cut -f1)
echo "gpu_wheels: $count wheels in $OUT ($((size / 1024)) MiB) for CPython $PY_VERSION x86-64; carry it: carry=[\"$OUT\"]"
