#!/usr/bin/env bash
# Stage 2, supervised fine-tuning: by default LoRA SFT of the embedded model on the shipped medical
# data (configs/sft.yaml), a few minutes on 2 CPU cores. Arguments pass through and override the
# config, e.g.:  bash run_sft.sh --max_steps 10 --output_dir outputs/sft-try
#
# Multi-GPU on one box with DeepSpeed ZeRO (after `bash setup.sh`):
#   .venv/bin/torchrun --nproc_per_node 8 supervised_finetuning.py --config configs/sft.yaml \
#     --model_name_or_path Qwen/Qwen2.5-7B-Instruct --deepspeed zero2.json --bf16 true --max_steps -1
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
eval "$(.venv/bin/python -m medgpt.allocator)"  # train on tcmalloc where installed (medgpt/allocator.py)
exec .venv/bin/python supervised_finetuning.py --config configs/sft.yaml "$@"
