# Sourced by run_rm.sh, run_dpo.sh, run_ppo.sh and run_grpo.sh: start from the SFT output when there
# is a complete one (metrics.json is written last, so an interrupted run does not count). A LoRA
# adapter is merged into the base model, a full model folder is used as it is.
# Sets the bash array FROM; SFT_OUTPUT overrides the folder (default outputs/sft).
SFT=${SFT_OUTPUT:-outputs/sft}
FROM=()
if [ ! -f "$SFT/metrics.json" ]; then
  echo "note: no complete SFT output at $SFT (run run_sft.sh first); starting from the embedded base model" >&2
elif [ -f "$SFT/adapter_config.json" ]; then
  FROM=(--adapter_name_or_path "$SFT")
else
  FROM=(--model_name_or_path "$SFT")
fi
