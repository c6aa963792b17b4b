#!/bin/sh
# The tests, at both ends of the transformers range the project declares:
#   1. the whole suite, with the transformers this environment has (setup.sh installs the newest
#      tested release);
#   2. the Hugging Face and compile-backend tests again with the oldest declared release, and
#      with 5.19 (the newest vLLM's CPU build allows; one of the two releases whose mask code breaks
#      dynamo's graph), each installed (with the dependencies that release needs changed) into a
#      throw-away overlay put first on PYTHONPATH, so this environment is left exactly as it was.
# Extra arguments go to the first pytest run (e.g. `-x`, `-k hf`).
set -e
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
"$PY" -m pytest -q "$@"

HF_TESTS="tests/test_hf.py tests/test_dynamo.py tests/test_hf_compat.py tests/test_serve_loop.py"
versions=$("$PY" -c "from dynaflow.runtime.hf.compat import ALSO_TESTED, oldest_transformers as o; print(o(), *ALSO_TESTED)")
for version in $versions; do
    overlay=$(mktemp -d)
    trap 'rm -rf "$overlay"' EXIT INT TERM
    echo "== the HF tests again with transformers $version (overlay $overlay)"
    "$PY" -m pip install --quiet --dry-run --report "$overlay/plan.json" "transformers==$version"
    "$PY" -c "
import json, sys
plan = json.load(open(sys.argv[1]))
print('\n'.join(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in plan['install']))
" "$overlay/plan.json" > "$overlay/pins.txt"
    "$PY" -m pip install --quiet --no-deps --target "$overlay/site" -r "$overlay/pins.txt"
    PYTHONPATH="$overlay/site${PYTHONPATH:+:$PYTHONPATH}" DYNAFLOW_EXPECT_TRANSFORMERS="$version" \
        "$PY" -m pytest -q $HF_TESTS
    rm -rf "$overlay"
done
