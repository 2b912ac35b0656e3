"""Stage 3 (RM): train a pairwise reward model that scores answers, for PPO and GRPO.

A sequence-classification head (one score) on top of the SFT model learns to score the `chosen`
answer above the `rejected` one (TRL's RewardTrainer, Bradley-Terry loss). Conversations are
rendered with the same chat template as SFT. Held-out pairwise accuracy (chosen scored above
rejected) and the mean score margin are reported before and after training.

Preference formats, detected per record (.jsonl/.json):
    {"conversations": [...prompt turns...], "chosen": "...", "rejected": "..."}   (or "messages")
    {"system": "...", "history": [[q, a]], "question": "...", "response_chosen": "...", "response_rejected": "..."}
    {"prompt": "..." or [...messages...], "chosen": "..." or [assistant message], "rejected": ...}

Example, on the SFT output (merged, or base + adapter):
    python reward_modeling.py --config configs/rm.yaml --model_name_or_path outputs/sft-merged

Outputs in --output_dir: a complete reward model (LoRA is merged in, so PPO and GRPO load the
folder directly), the tokenizer with its chat template, medgpt_config.yaml, metrics.json, loss.png.
"""

from __future__ import annotations

import logging

from trl import RewardConfig, RewardTrainer

from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args, run_cli, trl_options
from medgpt.data_files import InvalidRecords
from medgpt.modeling import load_model, load_template, load_tokenizer
from medgpt.tokenization import prepare_preference_data
from medgpt.training import evaluate_before_training, final_eval_metrics, finish_run, resolve_resume, save_model, start_run

logger = logging.getLogger("medgpt.rm")


def parse(argv: list[str] | None = None):
    """The stage's arguments from --config and the command line."""
    return parse_args((ModelArguments, DataArguments, LoraArguments, RewardConfig), argv, description=__doc__,
                      stage="rm", defaults={"overlong_policy": "truncate"},
                      replaced=trl_options("dataset_num_proc", "chat_template_path", "eos_token", "model_init_kwargs"))


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, lora_args, training_args, resolved = parse(argv)
    start_run(training_args, resolved)

    tokenizer = load_tokenizer(model_args)
    template = load_template(model_args, tokenizer)

    # Pairs are tokenized here with the stage's template (tool calls and reasoning included); TRL takes the ids.
    invalid = InvalidRecords.from_args(data_args, training_args.output_dir)
    train_dataset, eval_dataset, data_counts = prepare_preference_data(
        data_args, training_args, tokenizer, template, invalid, kind="reward",
    )
    data_counts.update(invalid.finish("preference data"))

    model = load_model(
        model_args, lora_args, task="sequence-classification", num_labels=1,
        gradient_checkpointing=training_args.gradient_checkpointing,
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token

    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    metrics = {}
    before = evaluate_before_training(trainer) if eval_dataset is not None else None
    if before is not None:
        metrics.update({"eval_accuracy_before": before["eval_accuracy"], "eval_margin_before": before["eval_margin"]})
        logger.info("Before training: held-out accuracy %.3f, margin %.3f", before["eval_accuracy"], before["eval_margin"])

    train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    save_model(trainer, tokenizer, template, training_args.output_dir, merge_adapter=True)  # before any report
    metrics.update(train_result.metrics)
    metrics.update(data_counts)
    if eval_dataset is not None:
        metrics.update(final_eval_metrics(trainer, perplexity=False))
        logger.info("After training: held-out accuracy %.3f, margin %.3f", metrics["eval_accuracy"], metrics["eval_margin"])
    finish_run(trainer, metrics, training_args.output_dir)
    return metrics


if __name__ == "__main__":
    run_cli(main)
