#!/usr/bin/env bash
# Stage 3, reward model: by default LoRA on the SFT output (outputs/sft) over the shipped
# preference pairs (configs/rm.yaml); saves a complete reward model for PPO and GRPO, a few minutes on 2 CPU cores.
# Arguments pass through and override the config, e.g.:  bash run_rm.sh --max_steps 5
#
# Multi-GPU on one box with DeepSpeed ZeRO (after `bash setup.sh`):
#   .venv/bin/torchrun --nproc_per_node 8 reward_modeling.py --config configs/rm.yaml --deepspeed zero2.json --bf16 true ...
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
# Start from the SFT output when there is one: a LoRA adapter is merged into the base, a full model is used as is.
SFT=${SFT_OUTPUT:-outputs/sft}
FROM=()
if [ -f "$SFT/adapter_config.json" ]; then
  FROM=(--adapter_name_or_path "$SFT")
elif [ -f "$SFT/config.json" ]; then
  FROM=(--model_name_or_path "$SFT")
else
  echo "note: no SFT output at $SFT (run run_sft.sh first); starting from the embedded base model" >&2
fi
exec .venv/bin/python reward_modeling.py --config configs/rm.yaml "${FROM[@]}" "$@"
