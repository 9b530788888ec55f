#!/usr/bin/env bash
# End-to-end device check: a random Llama-3.1-8B-shaped model in bf16 on the GPU is scored, pruned 20%,
# recovered with 20 LoRA steps (Lightning, bf16-true), exported, reloaded in a fresh process and, when vLLM
# with CUDA is installed, served. Prints one JSON line of figures; exits non-zero when one misses its goal.
# Needs no network. About 8 minutes at most on one H200.
#
#   bash scripts/gpu_check.sh                 # the 8B shape on cuda
#   bash scripts/gpu_check.sh --smollm2       # + SmolLM2-135M perplexity before/after pruning
#   bash scripts/gpu_check.sh --small         # a 2-layer shape on the CPU, seconds (what the tests run)
#   bash scripts/gpu_check.sh --out fig.json  # also write the JSON line to a file
#
# The logic and every option: scripts/gpu_check.py (--help). PYTHON overrides the interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$python" "$here/gpu_check.py" "$@"
