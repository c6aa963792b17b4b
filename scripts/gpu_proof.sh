#!/usr/bin/env bash
# The GPU kit: runs on the lent GPU machine (no network; see README "Status on GPUs") in stages
# that each fit a 10-minute call and together fit 30 minutes. Each stage writes
# $OUTDIR/<stage>.txt (default results/gpu/) headed by its command, the time and the GPU.
#
#   sh scripts/gpu_wheels.sh          # here, once: .whl/ holds the wheels the lent machine lacks
#   bash scripts/gpu_proof.sh probe   # there, first: one line per mechanism, works or the error
#   bash scripts/gpu_proof.sh tests   # pytest -m cuda: CUDA backend, graphs, green contexts
#   bash scripts/gpu_proof.sh overhead   # runtime vs eager, llama3-8b d256x2048+p512
#   bash scripts/gpu_proof.sh overlap    # hand-written NanoFlow-style vs sequential
#   bash scripts/gpu_proof.sh tune [WORKLOAD ...]   # 3 min of search per workload, then confirmation
#   bash scripts/gpu_proof.sh probe,tests,overhead  # several stages in one call, in order
#
# Before any stage: optuna and its storage stack are installed from $WHEELS (default .whl) with
# no index unless already importable, and the package is made importable from this checkout.
# Tune: MODEL (default llama3-8b), SPACE (nanoflow), TUNE_S (180 s per workload).
set -uo pipefail
OUTDIR="${OUTDIR:-results/gpu}"
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$OUTDIR"

fail() { echo "gpu_proof: $*" >&2; exit 2; }

setup() {
    if ! "$PY" -c "import optuna" 2>/dev/null; then
        ls "$WHEELS"/*.whl >/dev/null 2>&1 \
            || fail "optuna is not installed and $WHEELS holds no wheels: run 'sh scripts/gpu_wheels.sh' on a machine with network and carry $WHEELS"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dynaflow_site \
            "$WHEELS"/*.whl >/tmp/dynaflow_pip.log 2>&1 \
            || fail "installing the wheels in $WHEELS failed: $(grep -m1 -i error /tmp/dynaflow_pip.log)"
        export PYTHONPATH="/tmp/dynaflow_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if ! (cd /tmp && "$PY" -c "import dynaflow.runtime") 2>/dev/null; then
        local shim=/tmp/dynaflow_shim/dynaflow
        mkdir -p "$shim"
        for p in runtime tuner search_spaces; do ln -sfn "$PWD/$p" "$shim/$p"; done
        export PYTHONPATH="/tmp/dynaflow_shim${PYTHONPATH:+:$PYTHONPATH}"
    fi
    (cd /tmp && "$PY" -c "import dynaflow.tuner.cli, optuna") 2>/tmp/dynaflow_import.log \
        || fail "the package does not import: $(tail -1 /tmp/dynaflow_import.log)"
}

run() {
    local name=$1
    shift
    {
        echo "\$ $*"
        echo "# $(date -u +%FT%TZ); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
        local start=$SECONDS rc=0
        PYTHONUNBUFFERED=1 "$@" 2>&1 || rc=$?
        echo "# exit $rc, wall $((SECONDS - start)) s"
        exit $rc
    } | tee "$OUTDIR/$name.txt"
}

stages="${1:-}"
[ $# -gt 0 ] && shift
[ -n "$stages" ] || fail "usage: bash scripts/gpu_proof.sh probe|tests|overhead|overlap|tune[,...] [WORKLOAD ...]"
setup
rc=0
for stage in ${stages//,/ }; do
    case "$stage" in
        probe)
            run probe "$PY" -m dynaflow.runtime.probe
            code=$?
            if [ $code -eq 3 ]; then  # no GPU: the probe said so in one line; nothing else can run, nothing to keep
                rm -f "$OUTDIR/probe.txt"
                exit 3
            fi
            [ $code -eq 0 ] || rc=1 ;;
        tests) run pytest_cuda "$PY" -m pytest -q -m cuda -p no:cacheprovider || rc=1 ;;
        overhead) run runtime_overhead "$PY" benchmarks/runtime_overhead.py --device cuda --workload d256x2048+p512 || rc=1 ;;
        overlap) run handwritten_overlap "$PY" benchmarks/handwritten_overlap.py --device cuda || rc=1 ;;
        tune)
            workloads=("$@")
            [ ${#workloads[@]} -gt 0 ] || workloads=(d256x2048+p512 d64x2048)
            for w in "${workloads[@]}"; do
                run "tune_${MODEL:-llama3-8b}_${SPACE:-nanoflow}_$w" "$PY" -m dynaflow.tuner.cli tune --device cuda \
                    --model "${MODEL:-llama3-8b}" --space "${SPACE:-nanoflow}" \
                    --workload "$w" --timeout-s "${TUNE_S:-180}" --trials 200 --no-progress \
                    --storage "sqlite:///$OUTDIR/studies.db" --store "$OUTDIR" || { echo "tune $w failed: see above"; rc=1; }
            done
            run stored "$PY" -m dynaflow.tuner.cli list --store "$OUTDIR" ;;
        *) fail "unknown stage '$stage': probe, tests, overhead, overlap or tune" ;;
    esac
done
exit $rc
