"""Stage 4 (GRPO): group-relative policy optimization with verifiable medical rewards.

For each question the policy samples a group of answers (--num_generations); each answer is
scored by reward functions, and answers better than their group's average are reinforced (TRL's
GRPOTrainer). Rewards (medgpt/rewards.py), chosen with --reward_functions:

    accuracy     multiple-choice: the option letter(s) parsed from free text ("答案：B",
                 "The answer is (c)", "**D**", "A and C") equal the key; no letter scores 0
    open_answer  free-text answers (a disease, a drug): containment of the reference after
                 normalization, else character-level F1 (sensible for Chinese)
    format       brief reasoning followed by a final "Answer: ..." / "答案：..." line

plus, with --reward_model_path, the score of a reward model from reward_modeling.py. Weigh them
with --reward_weights (one number per reward, in that order).

Data (.jsonl/.json): {"question", "options": {"A": ..., ...}, "answer": "C"} multiple-choice
items (the options are rendered into the prompt) and {"question", "answer"} items (a letter when
the options are written in the question, else free text). Held-out accuracy is measured by
greedy generation before and after training.

Example:
    python grpo_training.py --config configs/grpo.yaml --model_name_or_path outputs/sft-merged
GPU users: --use_vllm true --vllm_mode colocate generates with vLLM inside the training process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer

from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args, run_cli, trl_options
from medgpt.data_files import InvalidRecords
from medgpt.evaluation import score_questions
from medgpt.generation import ChatModel
from medgpt.modeling import check_reward_model, load_model, load_template, load_tokenizer
from medgpt.rewards import REWARD_FUNCTIONS
from medgpt.tokenization import prepare_question_data
from medgpt.training import finish_run, resolve_resume, save_model, start_run

logger = logging.getLogger("medgpt.grpo")


@dataclass
class GRPOScriptArguments:
    """Rewards and held-out evaluation."""

    reward_functions: str = field(
        default="accuracy,open_answer,format",
        metadata={"help": f"Comma-separated rewards from: {', '.join(REWARD_FUNCTIONS)}."},
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A reward model folder from reward_modeling.py, added as one more reward."}
    )
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Answer length for held-out accuracy."})
    eval_batch_size: int = field(default=8, metadata={"help": "Questions answered together for held-out accuracy."})


def parse(argv: list[str] | None = None):
    """The stage's arguments from --config and the command line."""
    return parse_args(
        (ModelArguments, DataArguments, LoraArguments, GRPOScriptArguments, GRPOConfig), argv, description=__doc__,
        stage="grpo", replaced=trl_options("model_init_kwargs"))


def build_rewards(script_args: GRPOScriptArguments, training_args: GRPOConfig):
    """The reward functions (and reward model) named by the flags, with their tokenizers."""
    names = [name.strip() for name in script_args.reward_functions.split(",") if name.strip()]
    unknown = [name for name in names if name not in REWARD_FUNCTIONS]
    if unknown:
        raise SystemExit(f"--reward_functions: unknown {', '.join(unknown)}; valid: {', '.join(REWARD_FUNCTIONS)}.")
    rewards, tokenizers = [REWARD_FUNCTIONS[name] for name in names], [None] * len(names)
    if script_args.reward_model_path:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_reward_model(script_args.reward_model_path)
        rewards.append(AutoModelForSequenceClassification.from_pretrained(script_args.reward_model_path, num_labels=1))
        tokenizers.append(AutoTokenizer.from_pretrained(script_args.reward_model_path))
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(rewards):
        raise SystemExit(f"--reward_weights has {len(weights)} numbers for {len(rewards)} rewards "
                         f"({', '.join(names + (['reward model'] if script_args.reward_model_path else []))}).")
    if not rewards:
        raise SystemExit("No rewards: pass --reward_functions and/or --reward_model_path.")
    return rewards, tokenizers


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, lora_args, script_args, training_args, resolved = parse(argv)
    start_run(training_args, resolved)
    rewards, reward_tokenizers = build_rewards(script_args, training_args)

    tokenizer = load_tokenizer(model_args)
    template = load_template(model_args, tokenizer)
    tokenizer.chat_template = template.jinja  # TRL renders the prompts with the stage's template

    invalid = InvalidRecords.from_args(data_args, training_args.output_dir)
    train_dataset, eval_dataset = prepare_question_data(data_args, training_args, invalid)
    eval_items = list(eval_dataset) if eval_dataset is not None else []  # held-out questions, scored by generation

    model = load_model(model_args, lora_args, gradient_checkpointing=training_args.gradient_checkpointing)
    metrics = invalid.finish("GRPO questions")
    if eval_items:
        before = score_questions(ChatModel(model, tokenizer, template), eval_items, script_args.eval_batch_size,
                                 script_args.eval_max_new_tokens, desc="Held-out accuracy before")
        metrics.update({f"eval_{key}_before": value for key, value in before.items()})
        logger.info("Held-out accuracy before training: %.3f (%d questions)", before["accuracy"], before["n"])

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizers,
    )
    train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    save_model(trainer, tokenizer, template, training_args.output_dir)  # before any report
    metrics.update(train_result.metrics)
    metrics["train_questions"] = len(train_dataset)
    if eval_items:
        after = score_questions(ChatModel(trainer.model, tokenizer, template), eval_items, script_args.eval_batch_size,
                                script_args.eval_max_new_tokens, desc="Held-out accuracy after")
        metrics.update({f"eval_{key}": value for key, value in after.items()})
        logger.info("Held-out accuracy: %.3f before, %.3f after training", before["accuracy"], after["accuracy"])
    finish_run(trainer, metrics, training_args.output_dir, plot_keys=("reward", "loss"))
    return metrics


if __name__ == "__main__":
    run_cli(main)
