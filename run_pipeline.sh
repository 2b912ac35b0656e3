#!/usr/bin/env bash
# The main job on a fresh machine: set up, then the whole pipeline on the embedded default model and
# the shipped medical data (PT -> SFT -> RM -> DPO -> PPO -> GRPO), evaluation of the base model and
# every stage, outputs/pipeline/report.md, and sample answers from the final model. About 18
# minutes on 2 CPU cores, SFT one full epoch of the shipped conversations (plus setup the first time). Arguments go to run_pipeline.py (--force, --stages ..., --output_dir ...).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
eval "$(.venv/bin/python -m medgpt.allocator)"  # train on tcmalloc where installed (medgpt/allocator.py)
PY=.venv/bin/python
$PY run_pipeline.py "$@"

OUT=outputs/pipeline
for arg in "$@"; do case $arg in --output_dir=*) OUT=${arg#*=};; esac; done
if [ -f "$OUT/grpo/adapter_config.json" ]; then
  echo "== sample answers from the final model (SFT + GRPO adapter) =="
  $PY inference.py --base_model "$OUT/sft-merged" --lora_model "$OUT/grpo" --data_file data/demo_questions.txt \
    --output_file "$OUT/sample_answers.jsonl" --temperature 0 --max_new_tokens 160 --batch_size 4
  $PY - "$OUT/sample_answers.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    row = json.loads(line)
    print(f"\nQ: {row['question']}\nA: {row['answer']}")
    if row.get("safety_note"):
        print(row["safety_note"])
print("\n(Answers from a small demo model: not medical advice.)")
PYEOF
fi
