#!/usr/bin/env bash
# Stage 3, reward model: by default LoRA on the SFT output (outputs/sft) over the shipped preference
# pairs (configs/rm.yaml), a few minutes on 2 CPU cores; saves a complete reward model for PPO and GRPO.
# Arguments pass through and override the config, e.g.:  bash run_rm.sh --max_steps 5
#
# Multi-GPU on one box with DeepSpeed ZeRO (after `bash setup.sh`):
#   .venv/bin/torchrun --nproc_per_node 8 reward_modeling.py --config configs/rm.yaml --deepspeed zero2.json --bf16 true ...
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
eval "$(.venv/bin/python -m medgpt.allocator)"  # train on tcmalloc where installed (medgpt/allocator.py)
source scripts/from_sft.sh
exec .venv/bin/python reward_modeling.py --config configs/rm.yaml "${FROM[@]}" "$@"
