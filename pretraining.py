"""Stage 1: continued pretraining (PT) of a causal LM on medical text.

Reads documents from .txt files (one document per line; with --txt_paragraphs, paragraphs
separated by blank lines) and .jsonl/.json records with a `text` field. Exact duplicate
documents are removed and counted. Each document ends with EOS; all are concatenated and cut
into blocks of --block_size tokens, the standard continued-pretraining recipe. Validation
perplexity is reported before and after training.

Example (embedded default model, shipped text):
    python pretraining.py --config configs/pt.yaml

Outputs in --output_dir: the adapter (LoRA) or full model, the tokenizer, medgpt_config.yaml,
metrics.json, loss.png. The next stage takes it as --model_name_or_path (full model) or as
--adapter_name_or_path on the same base (LoRA).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args, run_cli
from medgpt.data_files import InvalidRecords
from medgpt.modeling import load_model, load_template, load_tokenizer
from medgpt.tokenization import prepare_pretraining_data
from medgpt.vocab import is_extended
from medgpt.training import evaluate_before_training, final_eval_metrics, finish_run, resolve_resume, save_model, start_run

logger = logging.getLogger("medgpt.pt")


@dataclass
class PretrainArguments:
    """How documents become training blocks."""

    block_size: int = field(default=512, metadata={"help": "Tokens per training block."})
    txt_paragraphs: bool = field(
        default=False,
        metadata={"help": "In .txt files, a document is a paragraph (blank-line separated) instead of a line."},
    )


def parse(argv: list[str] | None = None):
    """The stage's arguments from --config and the command line."""
    return parse_args((ModelArguments, DataArguments, LoraArguments, PretrainArguments, TrainingArguments), argv, description=__doc__,
                      stage="pt")


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, lora_args, pt_args, training_args, resolved = parse(argv)
    start_run(training_args, resolved)

    tokenizer = load_tokenizer(model_args)
    template = load_template(model_args, tokenizer)  # saved with the model for the next stages

    # Documents tokenized and cut into blocks through Arrow (or streamed), deduplicated, cached for the next run.
    invalid = InvalidRecords.from_args(data_args, training_args.output_dir)
    train_dataset, eval_dataset, data_counts = prepare_pretraining_data(
        data_args, training_args, tokenizer, pt_args.block_size, pt_args.txt_paragraphs, invalid
    )
    invalid_counts = invalid.finish("pretraining text")

    # A model whose vocabulary medgpt.vocab extended: its new embedding rows must learn, so they train too.
    model = load_model(model_args, lora_args, gradient_checkpointing=training_args.gradient_checkpointing,
                       train_embeddings=is_extended(model_args.model_name_or_path))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    metrics = {}
    before = evaluate_before_training(trainer) if eval_dataset is not None else None
    if before is not None:
        metrics["eval_perplexity_before"] = math.exp(min(before["eval_loss"], 50))
        logger.info("Validation perplexity before training: %.2f", metrics["eval_perplexity_before"])

    train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    save_model(trainer, tokenizer, template, training_args.output_dir)  # before any report
    metrics.update(train_result.metrics)
    metrics.update(data_counts)
    metrics.update(invalid_counts)
    if eval_dataset is not None:
        metrics.update(final_eval_metrics(trainer))
        before_text = f"{metrics['eval_perplexity_before']:.2f}" if before is not None else "-"
        logger.info("Validation perplexity: %s before, %.2f after training", before_text, metrics["eval_perplexity"])
    finish_run(trainer, metrics, training_args.output_dir)
    return metrics


if __name__ == "__main__":
    run_cli(main)
