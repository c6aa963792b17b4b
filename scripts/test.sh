#!/bin/sh
# The tests, at both ends of the transformers range the project declares:
#   1. the whole suite, with the transformers this environment has (setup.sh installs the newest
#      tested release);
#   2. the Hugging Face and compile-backend tests again with the oldest declared release,
#      installed (with the dependencies that release needs changed) into a throw-away overlay
#      put first on PYTHONPATH, so this environment is left exactly as it was.
# Extra arguments go to the first pytest run (e.g. `-x`, `-k hf`).
set -e
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
"$PY" -m pytest -q "$@"

HF_TESTS="tests/test_hf.py tests/test_dynamo.py tests/test_hf_compat.py tests/test_serve_loop.py"
oldest=$("$PY" -c "from dynaflow.runtime.hf_compat import oldest_transformers; print(oldest_transformers())")
overlay=$(mktemp -d)
trap 'rm -rf "$overlay"' EXIT INT TERM
echo "== the HF tests again with the oldest declared transformers, $oldest (overlay $overlay)"
"$PY" -m pip install --quiet --dry-run --report "$overlay/plan.json" "transformers==$oldest"
"$PY" -c "
import json, sys
plan = json.load(open(sys.argv[1]))
print('\n'.join(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in plan['install']))
" "$overlay/plan.json" > "$overlay/pins.txt"
"$PY" -m pip install --quiet --no-deps --target "$overlay/site" -r "$overlay/pins.txt"
PYTHONPATH="$overlay/site${PYTHONPATH:+:$PYTHONPATH}" DYNAFLOW_EXPECT_TRANSFORMERS="$oldest" \
    "$PY" -m pytest -q $HF_TESTS
