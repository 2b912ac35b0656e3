#!/usr/bin/env bash
# Stage 1, continued pretraining: by default LoRA on the embedded model over the shipped medical
# text (configs/pt.yaml), a few minutes on 2 CPU cores.
# Arguments pass through and override the config, e.g.:  bash run_pt.sh --max_steps 5
#
# Multi-GPU on one box with DeepSpeed ZeRO (after `bash setup.sh`):
#   .venv/bin/torchrun --nproc_per_node 8 pretraining.py --config configs/pt.yaml --deepspeed zero2.json --bf16 true ...
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
eval "$(.venv/bin/python -m medgpt.allocator)"  # train on tcmalloc where installed (medgpt/allocator.py)
exec .venv/bin/python pretraining.py --config configs/pt.yaml "$@"
