"""Stage 2: supervised fine-tuning (SFT) of a chat model on instruction and multi-turn data.

Reads ShareGPT, OpenAI-messages, Alpaca and question/answer records (.jsonl/.json), with reasoning
traces and tool calls, renders them with the chat template (the tokenizer's own, or its training
variant, unless --template_name is given), and trains with
TRL's SFTTrainer. Loss is computed on assistant answers only, every answer of a multi-turn
conversation, each including its end-of-turn token. Full, LoRA (default) and QLoRA
(--load_in_4bit / --load_in_8bit) training. Conversations are packed into rows of --max_length tokens with
block-diagonal attention so they never see each other (--packing false: one conversation per row, padded).
With LoRA and bf16 (the default where the CPU or GPU computes bf16 natively) the frozen weights are loaded
in bf16 and the adapter and its optimizer state stay fp32.

Example (embedded default model, shipped data):
    python supervised_finetuning.py --config configs/sft.yaml --max_steps 20

Outputs in --output_dir: the adapter (LoRA) or full model, the tokenizer with its chat template,
medgpt_config.yaml (the resolved arguments), metrics.json, loss.png and checkpoints.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from trl import SFTConfig, SFTTrainer

from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args, run_cli, trl_options
from medgpt.data_files import InvalidRecords
from medgpt.modeling import adapter_inputs_in_bf16, checkpoint_some_blocks, load_model, load_template, load_tokenizer
from medgpt.lm_head_loss import in_trl_sft
from medgpt.packed_attention import PACKED_SDPA
from medgpt.packing import SFTCollator, block_mask_trainer
from medgpt.tokenization import prepare_sft_data
from medgpt.training import final_eval_metrics, finish_run, resolve_resume, save_model, start_run

logger = logging.getLogger("medgpt.sft")


# SFTConfig's data options that MedGPT's own tokenization, labels and packing replace (refused, see parse_args).
SFT_REPLACED = ("dataset_num_proc", "dataset_text_field", "dataset_kwargs", "chat_template_path", "eos_token",
                "truncation_mode", "packing_strategy", "eval_packing", "shuffle_dataset", "assistant_only_loss",
                "completion_only_loss", "padding_free", "pad_to_multiple_of", "model_init_kwargs")


def check_sft_flags(training_args: SFTConfig, data_args: DataArguments) -> None:
    if training_args.packing and data_args.streaming:
        raise SystemExit("supervised_finetuning.py: error: --packing with --streaming: packing needs the whole "
                         "dataset; pass --packing false.")


# The stage's own defaults (below --config and the command line). Packing is on (TRL's default is off): on the
# shipped data it trains ~2x the real tokens per second at less memory than one padded conversation per row,
# and the block-diagonal masks keep every conversation's logits what they are alone (bench/sft_throughput.py).
SFT_DEFAULTS = {"packing": True}


def parse(argv: list[str] | None = None):
    """The stage's arguments from --config and the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, lora_args, training_args, resolved = parse_args(
        (ModelArguments, DataArguments, LoraArguments, SFTConfig), argv, description=__doc__, stage="sft",
        defaults=SFT_DEFAULTS, replaced=trl_options(*SFT_REPLACED))
    if data_args.streaming and training_args.packing and not _packing_given(argv, resolved["config"]):
        training_args.packing = resolved["packing"] = False  # the default gives way; an explicit --packing is refused
        logger.info("--streaming: packing (on by default) is off; it needs the whole dataset.")
    return model_args, data_args, lora_args, training_args, resolved


def _packing_given(argv: list[str], config: str | None) -> bool:
    """Whether --packing was set on the command line or in the --config file."""
    if any(token.split("=", 1)[0] in ("--packing", "--no_packing") for token in argv):
        return True
    if not config:
        return False
    import yaml

    return "packing" in (yaml.safe_load(Path(config).read_text()) or {})


class StageTrainer(block_mask_trainer(SFTTrainer)):
    """TRL's SFTTrainer over MedGPT's packed rows; its default loss (chunked_nll) computed by medgpt.lm_head_loss:
    each chunk's logits once, in the training precision, the gradient taken with them (same loss and metrics)."""

    def compute_loss(self, *args, **kwargs):
        with in_trl_sft():
            return super().compute_loss(*args, **kwargs)


def build_trainer(model_args, lora_args, training_args: SFTConfig, tokenizer, train_dataset, eval_dataset=None):
    """The model (full, LoRA or QLoRA as the flags say) and the SFTTrainer over MedGPT's prepared rows
    (bench/sft_throughput.py measures this same path)."""
    model = load_model(model_args, lora_args, gradient_checkpointing=training_args.gradient_checkpointing,
                       mixed_precision=training_args.bf16, packed=training_args.packing)
    attention = model.config._attn_implementation
    collator = SFTCollator(tokenizer.pad_token_id, dtype=model.dtype,
                           flatten=attention.startswith("flash_attention") or attention == PACKED_SDPA)
    # MedGPT tokenizes and packs itself (sequences isolated by block-diagonal masks or per-sequence attention);
    # TRL must not redo it.
    training_args.packing = False
    training_args.dataset_kwargs = {"skip_prepare_dataset": True}
    trainer = StageTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
    )
    adapter_inputs_in_bf16(trainer)
    checkpoint_some_blocks(trainer, model_args.checkpointed_blocks)
    return trainer


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, lora_args, training_args, resolved = parse(argv)
    start_run(training_args, resolved)
    check_sft_flags(training_args, data_args)

    # Tokenizer and template: the one template object renders training data and inference prompts.
    tokenizer = load_tokenizer(model_args)
    template = load_template(model_args, tokenizer)

    # Data: read and tokenized through Arrow (or streamed), cached for the next run; every problem in every file is
    # reported before anything is trained (or set aside: --on_invalid_record skip).
    invalid = InvalidRecords.from_args(data_args, training_args.output_dir)
    train_dataset, eval_dataset, data_counts = prepare_sft_data(data_args, training_args, tokenizer, template, invalid)
    invalid_counts = invalid.finish("SFT data")
    packing = training_args.packing  # the rows come packed (block-diagonal attention) from prepare_sft_data

    trainer = build_trainer(model_args, lora_args, training_args, tokenizer, train_dataset, eval_dataset)
    train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    save_model(trainer, tokenizer, template, training_args.output_dir)  # before any report
    metrics = dict(train_result.metrics)
    metrics.update(data_counts)
    metrics.update(invalid_counts)
    metrics["packing"] = packing
    metrics["attention"] = trainer.model.config._attn_implementation
    if eval_dataset is not None:
        metrics.update(final_eval_metrics(trainer))
    finish_run(trainer, metrics, training_args.output_dir)
    return metrics


if __name__ == "__main__":
    run_cli(main)
