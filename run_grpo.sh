#!/usr/bin/env bash
# Stage 4, GRPO: by default LoRA on the SFT output (outputs/sft) over the shipped medical questions,
# rewarded by answer accuracy and format (configs/grpo.yaml), a few minutes on 2 CPU cores.
# Add --reward_model_path outputs/rm to mix in the reward model.
# Arguments pass through and override the config, e.g.:  bash run_grpo.sh --max_steps 5
#
# Multi-GPU on one box with DeepSpeed ZeRO (after `bash setup.sh`):
#   .venv/bin/torchrun --nproc_per_node 8 grpo_training.py --config configs/grpo.yaml --deepspeed zero2.json --bf16 true ...
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
eval "$(.venv/bin/python -m medgpt.allocator)"  # train on tcmalloc where installed (medgpt/allocator.py)
source scripts/from_sft.sh
exec .venv/bin/python grpo_training.py --config configs/grpo.yaml "${FROM[@]}" "$@"
