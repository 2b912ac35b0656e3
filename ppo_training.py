"""Stage 4 (PPO): reinforcement learning from human feedback with the reward model.

The policy starts from the SFT model and writes answers to prompts; the reward model from
reward_modeling.py scores them; PPO (TRL 1.12's trl.experimental.ppo) raises the score while a
KL penalty keeps the policy near a frozen reference (with LoRA: the policy with its adapter
switched off). The value model starts from the reward model.

Prompts come from any SFT file (the turns before the last answer), any preference file (its
prompt), question files ({"question": ...}), {"prompt": "..."} records or plain .txt lines, and
are rendered by the chat template exactly as SFT rendered them.

What PPO users tune: --response_length, --kl_coef, --cliprange, --cliprange_value, --vf_coef,
--num_mini_batches, --num_ppo_epochs, --temperature, --stop_token eos, --missing_eos_penalty,
--total_episodes, --per_device_train_batch_size, --gradient_accumulation_steps; LoRA for the policy.
Reward, KL and value loss are logged every step (objective/scores, objective/kl, loss/value_avg).

Example:
    python ppo_training.py --config configs/ppo.yaml --model_name_or_path outputs/sft-merged \\
        --reward_model_path outputs/rm

Outputs in --output_dir: the policy (adapter or full model) in the same layout as SFT, so
inference.py and merge_peft_adapter.py take it unchanged; medgpt_config.yaml, metrics.json and a
plot of the reward and KL curves.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import fields

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental in TRL 1.12
from transformers import AutoModelForSequenceClassification  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args, run_cli, trl_options  # noqa: E402
from medgpt.data_files import InvalidRecords  # noqa: E402
from medgpt.modeling import check_reward_model, load_model, load_template, load_tokenizer  # noqa: E402
from medgpt.tokenization import prepare_prompt_data  # noqa: E402
from medgpt.training import finish_run, save_model, start_run  # noqa: E402

logger = logging.getLogger("medgpt.ppo")


def parse(argv: list[str] | None = None):
    """The stage's arguments from --config and the command line."""
    # PPOConfig's own world_size field (filled by the trainer later) hides TrainingArguments' property, and
    # --deepspeed needs it while parsing: take it from the launcher (torchrun/accelerate/deepspeed set it).
    return parse_args(
        (ModelArguments, DataArguments, LoraArguments, PPOConfig), argv, description=__doc__, stage="ppo",
        defaults={"world_size": int(os.environ.get("WORLD_SIZE", 1)), "max_prompt_length": 512},
        replaced=trl_options("dataset_num_proc"))


class DistributedPPOTrainer(PPOTrainer):
    """TRL's PPOTrainer, able to run in several processes under DeepSpeed: its reference-model switch
    and its save expect the policy-and-value model unwrapped, and its save breaks under DeepSpeed."""

    @contextmanager
    def null_ref_context(self):
        policy = self.accelerator.unwrap_model(self.model).policy
        with policy.disable_adapter() if self.is_peft_model and not self.ref_adapter_name else nullcontext():
            if self.ref_adapter_name:
                policy.set_adapter(self.ref_adapter_name)
            yield
            if self.ref_adapter_name:
                policy.set_adapter(self.model_adapter_name or "default")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save only the policy (adapter or full model), from the gathered weights under ZeRO-3."""
        output_dir = output_dir or self.args.output_dir
        state = self.accelerator.get_state_dict(self.model)  # every process takes part (ZeRO-3 gathers)
        if self.args.should_save:
            policy_state = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
            self.accelerator.unwrap_model(self.model).policy.save_pretrained(output_dir, state_dict=policy_state)


def check_model_paths(training_args: PPOConfig) -> None:
    """PPOConfig carries hub defaults for its model paths; MedGPT takes the policy from
    --model_name_or_path and needs a local reward model."""
    defaults = {f.name: f.default for f in fields(PPOConfig)}
    if training_args.sft_model_path != defaults["sft_model_path"]:
        raise SystemExit("--sft_model_path is not used here: pass the SFT model as --model_name_or_path "
                         "(and --adapter_name_or_path for an SFT adapter).")
    if training_args.reward_model_path == defaults["reward_model_path"] or not training_args.reward_model_path:
        raise SystemExit("--reward_model_path is required: the output folder of reward_modeling.py.")
    check_reward_model(training_args.reward_model_path)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, lora_args, training_args, resolved = parse(argv)
    if training_args.resume_from_checkpoint:
        raise SystemExit(
            f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: PPO runs cannot resume. TRL's PPO "
            "trainer keeps only the policy in checkpoint-* (not the value model or the rollout state). Start a new "
            "run from that policy instead: --adapter_name_or_path CHECKPOINT for a LoRA policy (merged into the "
            "weights, which then also serve as the KL reference) or --model_name_or_path CHECKPOINT for a full one, "
            "with --total_episodes set to the episodes left.")
    if training_args.max_steps > 0:
        raise SystemExit(f"--max_steps {training_args.max_steps}: TRL's PPO does not read it. Set the run's length "
                         "with --total_episodes (prompts answered in all) or --num_train_epochs.")
    check_model_paths(training_args)
    if training_args.world_size > 1 and not (training_args.deepspeed or training_args.deepspeed_plugin):
        raise SystemExit("PPO in several processes needs DeepSpeed: add --deepspeed zero2.json (or zero3.json). "
                         "TRL's PPO loop reads the model's policy, which plain DDP wrapping hides.")
    start_run(training_args, resolved)

    tokenizer = load_tokenizer(model_args, padding_side="left")
    template = load_template(model_args, tokenizer)

    invalid = InvalidRecords.from_args(data_args, training_args.output_dir)
    train_dataset, eval_dataset, prompt_counts = prepare_prompt_data(
        data_args, training_args, tokenizer, template, data_args.max_prompt_length, invalid)
    invalid_counts = invalid.finish("PPO prompts")
    if train_dataset is None or not len(train_dataset):
        raise SystemExit(f"No training prompts fit --max_prompt_length {data_args.max_prompt_length}.")
    eval_dataset = eval_dataset if eval_dataset is not None and len(eval_dataset) else train_dataset.select(range(2))

    policy = load_model(model_args, lora_args, gradient_checkpointing=training_args.gradient_checkpointing)
    # With LoRA the reference is the policy with its adapter off; full training needs a frozen copy.
    ref_policy = None if lora_args.use_peft else load_model(model_args, None, training=False)
    reward_model = AutoModelForSequenceClassification.from_pretrained(training_args.reward_model_path, num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(training_args.reward_model_path, num_labels=1)
    for model in (reward_model, value_model):
        model.config.pad_token_id = tokenizer.pad_token_id

    if training_args.deepspeed and os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        # TRL's PPOTrainer builds its own Accelerator, which takes DeepSpeed from accelerate's environment only
        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=training_args.deepspeed)
    trainer = DistributedPPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )
    trainer.train()
    save_model(trainer, tokenizer, template, training_args.output_dir)  # before any report
    steps = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    metrics = {**invalid_counts,
        "train_prompts": len(train_dataset), **prompt_counts, "steps": len(steps), "episodes": trainer.state.episode,
    }
    for key in ("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/value_avg", "loss/policy_avg"):
        if steps:
            metrics[f"{key}_first"], metrics[f"{key}_last"] = steps[0][key], steps[-1][key]
    finish_run(trainer, metrics, training_args.output_dir,
               plot_keys=("objective/scores", "objective/kl", "loss/value_avg"))
    return metrics


if __name__ == "__main__":
    run_cli(main)
