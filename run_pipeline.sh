#!/usr/bin/env bash
# The main job on a fresh machine: set up, then LoRA SFT of the embedded default model on the shipped
# medical data, merge the adapter, and answer a few sample questions with the trained model.
# Outputs: outputs/sft (adapter, loss.png, metrics.json), outputs/sft-merged, outputs/sample_answers.jsonl
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=.venv/bin/python
BASE=$($PY -m medgpt.base_model | tail -n 1)

echo "== [1/3] supervised fine-tuning (configs/sft.yaml) =="
$PY supervised_finetuning.py --config configs/sft.yaml --output_dir outputs/sft
echo "== [2/3] merging the LoRA adapter into the base model =="
$PY merge_peft_adapter.py --base_model "$BASE" --lora_model outputs/sft --output_dir outputs/sft-merged
echo "== [3/3] sample answers from the trained model =="
$PY inference.py --base_model outputs/sft-merged --data_file data/demo_questions.txt \
  --output_file outputs/sample_answers.jsonl --temperature 0 --max_new_tokens 160 --batch_size 4
$PY - <<'PYEOF'
import json
for line in open("outputs/sample_answers.jsonl", encoding="utf-8"):
    row = json.loads(line)
    print(f"\nQ: {row['question']}\nA: {row['answer']}")
print("\n(Answers from a small demo model: not medical advice. Loss curve: outputs/sft/loss.png)")
PYEOF
