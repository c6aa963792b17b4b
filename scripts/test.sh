#!/bin/sh
# The tests, at both ends of the transformers range the project declares, and with vLLM:
#   1. the whole suite, with the transformers this environment has (setup.sh installs the newest
#      tested release);
#   2. the Hugging Face and compile-backend tests again with the oldest declared release, and
#      with 5.19 (the newest vLLM's CPU build allows; one of the two releases whose mask code breaks
#      dynamo's graph); the 5.19 run also installs vLLM's CPU build (the `vllm` extra) and runs the
#      vLLM plugin's tests (tests/test_vllm.py, which must not skip there). Each release is
#      installed (with the dependencies it needs changed) into a throw-away overlay put first on
#      PYTHONPATH, so this environment is left exactly as it was.
# Extra arguments go to the first pytest run (e.g. `-x`, `-k hf`).
set -e
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
"$PY" -m pytest -q "$@"

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
for version in $versions; do
    overlay=$(mktemp -d)
    trap 'rm -rf "$overlay"' EXIT INT TERM
    also="" tests="$HF_TESTS"
    if [ "$version" = "$vllm_with" ]; then
        also="$vllm" tests="$HF_TESTS tests/test_vllm.py"
    fi
    echo "== the HF tests again with transformers $version${also:+, and the vLLM plugin's with $also} (overlay $overlay)"
    # shellcheck disable=SC2086  # $also is a list of requirement specs
    "$PY" -m pip install --quiet --dry-run --report "$overlay/plan.json" "transformers==$version" $also
    "$PY" -c "
import json, sys
plan = json.load(open(sys.argv[1]))
# vLLM's CPU build pulls torchvision, torchaudio and torchcodec builds that fail against CPU torch
# ('operator torchvision::nms does not exist'); text models need none of them
skip = {'torchvision', 'torchaudio', 'torchcodec'}
print('\n'.join(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in plan['install']
                if i['metadata']['name'].lower() not in skip))
" "$overlay/plan.json" > "$overlay/pins.txt"
    "$PY" -m pip install --quiet --no-deps --target "$overlay/site" -r "$overlay/pins.txt"
    # shellcheck disable=SC2086
    PYTHONPATH="$overlay/site${PYTHONPATH:+:$PYTHONPATH}" DYNAFLOW_EXPECT_TRANSFORMERS="$version" \
        DYNAFLOW_EXPECT_VLLM="${also:+1}" "$PY" -m pytest -q $tests
    rm -rf "$overlay"
done
