#!/usr/bin/env bash
# The GPU proof (issue 7), in stages that each fit a 10-minute call; every stage writes
# results/gpu/<stage>.txt (or $OUTDIR) headed by its command, the time and the GPU.
#
#   bash scripts/gpu_proof.sh tests        # pytest -m cuda: CUDA backend, graphs, green contexts
#   bash scripts/gpu_proof.sh overhead     # runtime vs eager, llama3-8b d256x2048+p512
#   bash scripts/gpu_proof.sh overlap      # hand-written NanoFlow-style vs sequential
#   bash scripts/gpu_proof.sh tune [WORKLOAD ...]   # 7 min of search per workload, then confirmation
#   SPACE=dbo bash scripts/gpu_proof.sh tune         # the dbo space's best, for the comparison
#   MODEL=mixtral-8x7b bash scripts/gpu_proof.sh tune d256x2048+p512
#
# Default tune workloads: decode 64/256/512 x 2048, with and without 512 prefill tokens;
# MODEL defaults to llama3-8b and SPACE to nanoflow.
set -euo pipefail
OUTDIR="${OUTDIR:-results/gpu}"
mkdir -p "$OUTDIR"

run() {
    local name=$1
    shift
    {
        echo "\$ $*"
        echo "# $(date -u +%FT%TZ); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
        local start=$SECONDS rc=0
        "$@" 2>&1 || rc=$?
        echo "# exit $rc, wall $((SECONDS - start)) s"
        return $rc
    } | tee "$OUTDIR/$name.txt"
}

stage="${1:-}"
[ $# -gt 0 ] && shift
case "$stage" in
    tests) run pytest_cuda python3 -m pytest -q -m cuda ;;
    overhead) run runtime_overhead python3 benchmarks/runtime_overhead.py --device cuda --workload d256x2048+p512 ;;
    overlap) run handwritten_overlap python3 benchmarks/handwritten_overlap.py --device cuda ;;
    tune)
        workloads=("$@")
        [ ${#workloads[@]} -gt 0 ] || workloads=(d64x2048 d256x2048 d512x2048 d64x2048+p512 d256x2048+p512 d512x2048+p512)
        for w in "${workloads[@]}"; do
            run "tune_${MODEL:-llama3-8b}_${SPACE:-nanoflow}_$w" python3 -m dynaflow.tuner.cli tune --device cuda \
                --model "${MODEL:-llama3-8b}" --space "${SPACE:-nanoflow}" \
                --workload "$w" --timeout-s 420 --trials 200 --no-progress \
                --storage "sqlite:///$OUTDIR/studies.db" --store "$OUTDIR" || echo "tune $w failed: see above"
        done
        run stored python3 -m dynaflow.tuner.cli list --store "$OUTDIR"
        ;;
    *) echo "usage: bash scripts/gpu_proof.sh tests|overhead|overlap|tune [WORKLOAD ...]" >&2; exit 2 ;;
esac
