#!/usr/bin/env bash
# On-policy distillation (configs/opd.yaml): the teacher is your merged SFT model (outputs/sft-merged) when
# there is one, else the embedded model; the student is made once from the teacher by keeping half its
# blocks (outputs/student). Arguments pass through and override the config, e.g.:
#   bash run_opd.sh --max_steps 40 --lmbda 1.0
#   TEACHER=Qwen/Qwen2.5-7B-Instruct STUDENT=Qwen/Qwen2.5-0.5B-Instruct bash run_opd.sh --use_peft true
# Multi-GPU: .venv/bin/torchrun --nproc_per_node 8 opd_training.py --config configs/opd.yaml --deepspeed zero2.json ...
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
eval "$(.venv/bin/python -m medgpt.allocator)"  # train on tcmalloc where installed (medgpt/allocator.py)
TEACHER=${TEACHER:-}
if [ -z "$TEACHER" ] && [ -f outputs/sft-merged/config.json ]; then
  TEACHER=outputs/sft-merged
fi
TEACHER_ARGS=()
if [ -n "$TEACHER" ]; then
  TEACHER_ARGS=(--model_name_or_path "$TEACHER")
fi
STUDENT=${STUDENT:-outputs/student}
if [ ! -f "$STUDENT/config.json" ]; then
  LAYERS=$(.venv/bin/python -c "import json,sys; from medgpt.modeling import resolve_model_path; from medgpt.args import ModelArguments; \
p=resolve_model_path(ModelArguments(model_name_or_path=sys.argv[1] or None)); print(json.load(open(p+'/config.json'))['num_hidden_layers']//2)" "$TEACHER")
  .venv/bin/python -m medgpt.student "${TEACHER_ARGS[@]}" --num_layers "$LAYERS" --output_dir "$STUDENT"
fi
TEACHER_PATH=$(.venv/bin/python -c "import sys; from medgpt.modeling import resolve_model_path; from medgpt.args import ModelArguments; \
print(resolve_model_path(ModelArguments(model_name_or_path=sys.argv[1] or None)))" "$TEACHER")
exec .venv/bin/python opd_training.py --config configs/opd.yaml --model_name_or_path "$STUDENT" \
  --teacher_model_name_or_path "$TEACHER_PATH" "$@"
