"""Merge a LoRA adapter into its base model and save an ordinary model folder.

    python merge_peft_adapter.py --base_model BASE --lora_model outputs/sft --output_dir outputs/sft-merged

The result loads like any Hugging Face model: as --model_name_or_path of the next stage, in
inference.py, and in vLLM. The tokenizer (with the chat template the adapter was trained with)
is taken from the adapter folder when it has one, and so is the generation config that lists the
template's end-of-turn tokens. The folder is written to a temporary name and
renamed when complete, so an interrupted merge never leaves a folder that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from medgpt.args import ModelArguments, parse_args
from medgpt.modeling import load_model, load_tokenizer


@dataclass
class MergeArguments:
    """Where the merged model goes."""

    output_dir: str = field(default="outputs/merged", metadata={"help": "Folder for the merged model."})


def main(argv: list[str] | None = None) -> Path:
    model_args, args, _ = parse_args((ModelArguments, MergeArguments), argv, description=__doc__)
    adapter = model_args.adapter_name_or_path
    if not adapter:
        raise SystemExit("--lora_model (the adapter folder to merge) is required.")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise SystemExit("Merge into full-precision weights: drop --load_in_4bit/--load_in_8bit.")
    tokenizer_source = adapter if Path(adapter, "tokenizer_config.json").is_file() else None
    tokenizer = load_tokenizer(
        dataclasses.replace(model_args, tokenizer_name_or_path=tokenizer_source or model_args.tokenizer_name_or_path)
    )
    adapter_config = json.loads(Path(adapter, "adapter_config.json").read_text()) if Path(adapter).is_dir() else {}
    task = "sequence-classification" if adapter_config.get("task_type") == "SEQ_CLS" else "causal-lm"  # reward models
    model = load_model(model_args, None, training=False, task=task)  # loads the adapter and merges it
    target = Path(args.output_dir)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    if Path(adapter, "generation_config.json").is_file():  # the end-of-turn tokens of the adapter's template
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(adapter)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    print(f"Merged {adapter} into {model_args.model_name_or_path}: {target}")
    return target


if __name__ == "__main__":
    main(sys.argv[1:])
