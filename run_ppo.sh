#!/usr/bin/env bash
# Stage 4, PPO: by default a LoRA policy from the SFT output (outputs/sft), rewards from the reward
# model in outputs/rm (run run_rm.sh first), prompts from the shipped SFT data (configs/ppo.yaml),
# a few minutes on 2 CPU cores.
# Arguments pass through and override the config, e.g.:  bash run_ppo.sh --total_episodes 8
#
# Multi-GPU on one box with DeepSpeed ZeRO (after `bash setup.sh`):
#   .venv/bin/torchrun --nproc_per_node 8 ppo_training.py --config configs/ppo.yaml --deepspeed zero2.json --bf16 true ...
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
eval "$(.venv/bin/python -m medgpt.allocator)"  # train on tcmalloc where installed (medgpt/allocator.py)
source scripts/from_sft.sh
exec .venv/bin/python ppo_training.py --config configs/ppo.yaml "${FROM[@]}" "$@"
