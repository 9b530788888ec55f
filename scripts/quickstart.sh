#!/usr/bin/env bash
# Set up (if needed) and run the quickstart: prune SmolLM2-135M by 20% with NIRVANA, recover with LoRA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m nirvana_lightning fit --config configs/quickstart.yaml "$@"
