#!/usr/bin/env bash
# Check the GPU kit here, as the lent machine will meet it, as closely as this machine allows:
# Python 3.12 in a fresh virtual environment holding only the packages that machine has
# (../shared/DESIGN.md, "The lent GPU machine": torch 2.11, transformers 5.17, pytest,
# pytest-timeout, ...; no optuna, no nbformat, no ray), the wheel folder gpu_wheels.sh builds for
# CPython 3.12, and no package index while the kit runs. Then `gpu_proof.sh` with the stages
# `collect` (pytest --collect-only of the tests stage: every module must import or skip, and the
# cuda tests must be collected) and `probe` (no GPU here: one line, exit 3).
#
#   bash scripts/check_gpu_kit.sh     # ~3-5 minutes the first time (torch 2.11 from the index)
set -euo pipefail
if [ -z "${PY312:-}" ]; then  # the first python3.12 that runs (a pyenv shim may exist and refuse)
    for candidate in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
        if "$candidate" -c "" 2>/dev/null; then PY312=$candidate; break; fi
    done
fi
"${PY312:-false}" -c "" 2>/dev/null || { echo "check_gpu_kit: needs python3.12 (the lent machine's Python); set PY312" >&2; exit 2; }
WORK="${WORK:-/tmp/dynaflow_kit_check}"
rm -rf "$WORK" /tmp/dynaflow_site /tmp/dynaflow_shim
"$PY312" -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
echo "check_gpu_kit: the lent machine's packages into a Python $("$V" -c 'import platform; print(platform.python_version())') venv"
"$V" -m pip install --quiet torch==2.11.0 transformers==5.17.0 pytest pytest-timeout hypothesis scipy pandas \
    matplotlib tqdm psutil PyYAML nvidia-ml-py cuda-bindings 2>&1 | grep -v "^WARNING: Location" || true
for missing in optuna sqlalchemy alembic nbformat nbclient ray; do
    if "$V" -c "import $missing" 2>/dev/null; then echo "check_gpu_kit: $missing is in the fresh environment" >&2; exit 1; fi
done
echo "check_gpu_kit: the kit's wheels for CPython 3.12"
PY_VERSION=3.12 WHEELS="$WORK/wheels" sh scripts/gpu_wheels.sh 2>/dev/null
set +e
PIP_NO_INDEX=1 PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PYTHON="$V" WHEELS="$WORK/wheels" OUTDIR="$WORK/out" \
    OUT="$WORK/returned" STAGES=collect,probe bash scripts/gpu_proof.sh >"$WORK/stdout" 2>"$WORK/stderr"
rc=$?
set -e
echo "gpu_proof.sh (STAGES=collect,probe) -> exit $rc; stdout:"
cat "$WORK/stdout"
echo "stderr:"
cat "$WORK/stderr"
echo "collect stage:"
grep -v '^#' "$WORK/out/collect.txt" | tail -n 4
collected=$(grep -Eo '^[0-9]+(/[0-9]+)? tests? collected' "$WORK/out/collect.txt" | grep -Eo '^[0-9]+' || echo 0)
ok=1
grep -Eq "error|Error" "$WORK/out/collect.txt" && { echo "check_gpu_kit: collection had errors" >&2; ok=0; }
[ "$collected" -gt 0 ] || { echo "check_gpu_kit: no cuda test collected" >&2; ok=0; }
[ $rc -eq 3 ] && grep -q "^probe: no GPU" "$WORK/stdout" && [ ! -e "$WORK/out/probe.txt" ] || ok=0
[ -s "$WORK/returned/gpu_results.tgz" ] && [ -s "$WORK/returned/summary.txt" ] \
    || { echo "check_gpu_kit: nothing was packed for \$OUT" >&2; ok=0; }
[ $ok -eq 1 ] && echo "check_gpu_kit: OK ($collected cuda tests collected on the image's packages; probe exit 3 without a GPU)" \
    || { echo "check_gpu_kit: FAILED" >&2; exit 1; }
