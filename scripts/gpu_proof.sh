#!/usr/bin/env bash
# The GPU kit: one call on the lent GPU machine (no network; README "Status on GPUs"). It runs
# every stage below in order, each under its own timeout, so that the whole fits one command
# (10 minutes there) with time to spare, and whatever happens leaves its evidence behind:
#
#   probe     one line per mechanism (green contexts, granted SMs, events, graph capture modes, NVML)
#   tests     pytest -m cuda (per-test timeout)
#   overhead  the sequential schedule vs the eager model, eager and under CUDA graphs
#   overlap   a hand-written NanoFlow-style schedule vs sequential, in the same mode
#   profile   the performance model's profile of llama3-8b d256x2048+p512 bf16 on the partition
#             steps (cached for the tune), its per-op table, headroom and best predicted schedules
#   tune      the same workload, ~75 s of search from the model's best, then the confirmation; ends
#             with the model's error there (Spearman rho, median |error|)
#   report    the study's figures, the timelines of the sequential and best schedules (PNG) and
#             their Perfetto traces (trace_sequential.json, trace_best.json)
#
#   sh scripts/gpu_wheels.sh        # here, once: .whl/ holds the wheels the lent machine lacks
#   bash scripts/gpu_proof.sh       # there, in one call: carry .whl; everything runs
#   STAGES=probe,tests bash scripts/gpu_proof.sh   # a subset, in order
#   STAGES=collect,probe ...        # what scripts/check_gpu_kit.sh runs without a GPU
#   bash scripts/gpu_proof.sh --estimate    # print the estimate only
#   LIMITS="tests=200" ...          # another timeout for a stage, in seconds
#
# Every stage writes $OUTDIR/<stage>.txt (default results/gpu/), headed by its command. After each
# stage, and by a trap on exit, $OUTDIR is packed into $OUT/gpu_results.tgz with $OUT/summary.txt
# beside it when $OUT is set (what comes back from the lent machine: 2 files). Exit 0 only if
# every stage passed; 3 (and nothing written) where no GPU is visible.
set -uo pipefail
OUTDIR="${OUTDIR:-results/gpu}"
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
STAGES="${STAGES:-probe,tests,overhead,overlap,profile,tune,report}"
MODEL="${MODEL:-llama3-8b}"
WORKLOAD="${WORKLOAD:-d256x2048+p512}"
TUNE_S="${TUNE_S:-75}"
# Each stage's timeout in seconds: the kit's own estimate of the whole is their sum (printed first).
declare -A LIMIT=([setup]=20 [collect]=60 [probe]=45 [tests]=120 [overhead]=50 [overlap]=60 [profile]=60 [tune]=$((TUNE_S + 60)) [report]=45)
for override in ${LIMITS:-}; do LIMIT[${override%%=*}]=${override#*=}; done  # e.g. LIMITS="tests=200 tune=300"
declare -a SUMMARY=()

fail() { echo "gpu_proof: $*" >&2; exit 2; }

pack() {  # the archive and the summary, written whole each time (a cut call keeps the last pack)
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    printf '%s\n' "gpu_proof.sh on ${HOSTNAME:-?} at $(date -u +%FT%TZ); stages $STAGES" "${SUMMARY[@]}" \
        >"$OUT/summary.txt.tmp" && mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
    cp "$OUT/summary.txt" "$OUTDIR/summary.txt" 2>/dev/null
    tar -czf "$OUT/gpu_results.tgz.tmp" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" 2>/dev/null \
        && mv "$OUT/gpu_results.tgz.tmp" "$OUT/gpu_results.tgz"
}

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

run() {  # run NAME CMD...: under the stage's timeout, output to $OUTDIR/NAME.txt; its status
    local name=$1 start=$SECONDS rc=0
    shift
    {
        echo "\$ $*"
        echo "# $(date -u +%FT%TZ); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'); limit ${LIMIT[$name]} s"
    } >"$OUTDIR/$name.txt"
    PYTHONUNBUFFERED=1 timeout -k 10 "${LIMIT[$name]}" "$@" >>"$OUTDIR/$name.txt" 2>&1 || rc=$?
    local wall=$((SECONDS - start)) verdict=passed
    [ $rc -eq 0 ] || verdict="FAILED (exit $rc)"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT after ${LIMIT[$name]} s"
    [ "$name" = probe ] && [ $rc -eq 3 ] && verdict="no GPU (exit 3)"
    echo "# exit $rc, wall $wall s" >>"$OUTDIR/$name.txt"
    SUMMARY+=("$(printf '%-9s %-28s %4d s  %s' "$name" "$verdict" "$wall" "$(grep -v '^#' "$OUTDIR/$name.txt" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-110)")")
    echo "${SUMMARY[-1]}"
    pack
    return $rc
}

mkdir -p "$OUTDIR"
trap pack EXIT
total=0
for stage in setup ${STAGES//,/ }; do
    [ -n "${LIMIT[$stage]:-}" ] || fail "unknown stage '$stage': probe, tests, overhead, overlap, profile, tune, report (or collect)"
    total=$((total + LIMIT[$stage]))
done
echo "gpu_proof: stages $STAGES; estimate: at most $((total / 60)) min $((total % 60)) s (the sum of the stages' timeouts)"
[ "${1:-}" = "--estimate" ] && { trap - EXIT; exit 0; }
start=$SECONDS
setup
SUMMARY+=("setup     passed in $((SECONDS - start)) s")
storage="sqlite:///$OUTDIR/studies.db"
rc=0
for stage in ${STAGES//,/ }; do
    case "$stage" in
        probe)
            run probe "$PY" -m dynaflow.runtime.probe
            code=$?
            if [ $code -eq 3 ]; then  # no GPU: the probe said so in one line; nothing else can run, nothing to keep
                rm -f "$OUTDIR/probe.txt"
                trap - EXIT
                exit 3
            fi
            [ $code -eq 0 ] || rc=1 ;;
        collect) run collect "$PY" -m pytest --collect-only -q -m cuda -p no:cacheprovider tests || rc=1 ;;
        tests) run tests "$PY" -m pytest -q -m cuda -p no:cacheprovider --timeout 60 tests || rc=1 ;;
        overhead) run overhead "$PY" benchmarks/runtime_overhead.py --device cuda --model "$MODEL" --workload "$WORKLOAD" \
                      --repeats 20 || rc=1 ;;
        overlap) run overlap "$PY" benchmarks/handwritten_overlap.py --device cuda --model "$MODEL" --workload "$WORKLOAD" \
                     --rounds 3 || rc=1 ;;
        profile) run profile "$PY" -m dynaflow.tuner.cli profile --device cuda --model "$MODEL" --workload "$WORKLOAD" \
                     --store "$OUTDIR" || rc=1 ;;
        tune) run tune "$PY" -m dynaflow.tuner.cli tune --device cuda --model "$MODEL" --workload "$WORKLOAD" \
                  --timeout-s "$TUNE_S" --trials 200 --no-progress --storage "$storage" --store "$OUTDIR" || rc=1 ;;
        report) run report "$PY" -m dynaflow.tuner.cli report --storage "$storage" --store "$OUTDIR" \
                    --out "$OUTDIR/report" || rc=1 ;;
    esac
done
SUMMARY+=("total     $((SECONDS - start)) s; exit $rc")
echo "${SUMMARY[-1]}"
exit $rc
