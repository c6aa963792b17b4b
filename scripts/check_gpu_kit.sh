#!/usr/bin/env bash
# Check the GPU kit here, as the lent machine will meet it: a fresh virtual environment holding
# only the packages that machine has (with the CPU torch in place of its CUDA torch), the wheel
# folder built by gpu_wheels.sh for this Python, and no package index. `gpu_proof.sh probe` must
# install the wheels, import the package, and stop at the probe's one line saying it needs a GPU
# (exit 3). Takes ~2 minutes (the environment's packages come from the index or the local cache).
set -euo pipefail
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/dynaflow_kit_check}"
rm -rf "$WORK" /tmp/dynaflow_site /tmp/dynaflow_shim
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
# The lent machine's packages (../shared/DESIGN.md, "The lent GPU machine"), minus the CUDA build.
"$V" -m pip install --quiet torch==2.13.0 pytest scipy pandas matplotlib tqdm PyYAML nvidia-ml-py cuda-bindings transformers
version=$("$V" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PY_VERSION="$version" WHEELS="$WORK/wheels" PYTHON="$PY" sh scripts/gpu_wheels.sh 2>/dev/null
for missing in optuna sqlalchemy alembic; do
    if "$V" -c "import $missing" 2>/dev/null; then echo "check_gpu_kit: $missing is in the fresh environment" >&2; exit 1; fi
done
set +e
PIP_NO_INDEX=1 PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PYTHON="$V" WHEELS="$WORK/wheels" OUTDIR="$WORK/out" \
    bash scripts/gpu_proof.sh probe >"$WORK/stdout" 2>"$WORK/stderr"
rc=$?
set -e
echo "gpu_proof.sh probe -> exit $rc; stdout:"
cat "$WORK/stdout"
echo "stderr:"
cat "$WORK/stderr"
[ $rc -eq 3 ] && grep -q "^probe: no GPU" "$WORK/stdout" && [ ! -e "$WORK/out/probe.txt" ] \
    && PYTHONPATH=/tmp/dynaflow_site:/tmp/dynaflow_shim "$V" -c "import optuna, dynaflow.tuner.cli; print('imports in the kit: optuna', optuna.__version__, '+ dynaflow.tuner.cli')" \
    && echo "check_gpu_kit: OK" || { echo "check_gpu_kit: FAILED" >&2; exit 1; }
