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
from dataclasses import dataclass, field
from pathlib import Path

from medgpt.args import ModelArguments, parse_args, run_cli
from medgpt.modeling import load_model, load_tokenizer


@dataclass
class MergeArguments:
    """Where the merged model goes."""

    output_dir: str = field(default="outputs/merged", metadata={
        "help": "Folder for the merged model. An earlier merge there is replaced; any other non-empty folder is "
                "refused unless --overwrite_output_dir true."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace --output_dir even if it holds something other than an earlier merge (its files are deleted)."})


MARKER = "merged_from.json"  # written into every merged folder, so a later merge may replace it
# a folder holding only these files is a model that a merge may replace
MODEL_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
               "special_tokens_map.json", "added_tokens.json", "merges.txt", "vocab.txt", "chat_template.jinja",
               "model.safetensors.index.json", "tokenizer.model"}


def check_target(target: Path, model_args, overwrite: bool) -> None:
    """Refuse to delete the inputs or a folder this script did not write."""
    for flag, source in (("--lora_model", model_args.adapter_name_or_path),
                         ("--base_model", model_args.model_name_or_path)):
        if source and target.exists() and Path(source).exists() and target.resolve() == Path(source).resolve():
            raise SystemExit(f"--output_dir {target} is the {flag} folder; merging there would delete it. "
                             "Choose another --output_dir (e.g. outputs/sft-merged).")
    if not target.is_dir() or (target / MARKER).is_file() or overwrite:
        return
    others = sorted(p.name for p in target.iterdir()
                    if not (p.is_file() and (p.name in MODEL_FILES or p.name.endswith(".safetensors"))))
    if others:
        raise SystemExit(f"--output_dir {target} holds more than a merged model ({', '.join(others[:5])}); merging "
                         "there would delete it. Choose a new folder, or pass --overwrite_output_dir true.")


def main(argv: list[str] | None = None) -> Path:
    model_args, args, _ = parse_args((ModelArguments, MergeArguments), argv, description=__doc__)
    adapter = model_args.adapter_name_or_path
    if not adapter:
        raise SystemExit("--lora_model (the adapter folder to merge) is required.")
    target = Path(args.output_dir)
    check_target(target, model_args, args.overwrite_output_dir)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise SystemExit("Merge into full-precision weights: drop --load_in_4bit/--load_in_8bit.")
    tokenizer_source = adapter if Path(adapter, "tokenizer_config.json").is_file() else None
    tokenizer = load_tokenizer(
        dataclasses.replace(model_args, tokenizer_name_or_path=tokenizer_source or model_args.tokenizer_name_or_path)
    )
    adapter_config = json.loads(Path(adapter, "adapter_config.json").read_text()) if Path(adapter).is_dir() else {}
    task = "sequence-classification" if adapter_config.get("task_type") == "SEQ_CLS" else "causal-lm"  # reward models
    model = load_model(model_args, None, training=False, task=task)  # loads the adapter and merges it
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    if Path(adapter, "generation_config.json").is_file():  # the end-of-turn tokens of the adapter's template
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(adapter)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({"base_model": model_args.model_name_or_path, "lora_model": adapter}))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    print(f"Merged {adapter} into {model_args.model_name_or_path}: {target}")
    return target


if __name__ == "__main__":
    run_cli(main)
