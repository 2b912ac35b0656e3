"""Stage 3 (DPO): direct preference optimization of the SFT model, and its variants.

Learns from preference pairs without a reward model (TRL's DPOTrainer). The variants are flags:
`--loss_type` takes any DPO loss TRL offers (sigmoid = DPO, ipo, hinge, robust, bco_pair,
sppo_hard, nca_pair, aot, apo_zero, apo_down, discopop, ...) plus `orpo` (TRL's ORPO trainer,
no reference model), `simpo` (TRL's CPO trainer with the SimPO loss, reference-free) and `kto`
(TRL's KTOTrainer on unpaired feedback: conversations whose last answer has "label": true|false,
or pairs split into a desirable and an undesirable answer). Each variant takes its trainer's own flags
(--simpo_gamma, --desirable_weight ...).
With LoRA the reference model is the SFT model itself with the new adapter switched off, so no
second copy sits in memory; full fine-tuning loads a frozen copy as reference. The DPO loss (sigmoid)
takes the answers' log-probabilities a chunk of tokens at a time from the last hidden states
(--chunked_logps, on by default): no rows x length x vocabulary logits tensor is ever held.

Preference formats are those of reward_modeling.py (see its --help). Held-out reward accuracy
(the implicit reward of `chosen` above `rejected`) and margins are reported after training.

Example, on the SFT output:
    python dpo_training.py --config configs/dpo.yaml --model_name_or_path outputs/sft-merged
    python dpo_training.py --config configs/dpo.yaml --loss_type ipo --beta 0.5

Outputs in --output_dir: the adapter (LoRA) or full model, the tokenizer with its chat template,
medgpt_config.yaml, metrics.json, loss.png.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental in TRL 1.12
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from medgpt.answer_logps import answer_logps, backbone_and_head, logit_modifiers  # noqa: E402
from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args, run_cli, trl_options  # noqa: E402
from medgpt.data_files import InvalidRecords
from medgpt.modeling import adapter_inputs_in_bf16, load_model, load_template, load_tokenizer
from medgpt.tokenization import prepare_preference_data
from medgpt.training import final_eval_metrics, finish_run, resolve_resume, save_model, start_run

logger = logging.getLogger("medgpt.dpo")


@dataclass
class DPOScriptArguments:
    """How the DPO loss is computed."""

    chunked_logps: bool = field(default=True, metadata={
        "help": "DPO (--loss_type sigmoid): take each answer's log-probability from the model's last hidden states, "
                "answer tokens only, a chunk of tokens at a time, recomputed in the backward pass, instead of from "
                "logits over the whole vocabulary at every position (rows x length x vocabulary values, e.g. 1.2 GB "
                "in bf16 for 4 rows of 1,000 tokens over a 152k vocabulary, held through the backward). Same loss, "
                "a fraction of the memory. Other losses, --use_weighting, --ld_alpha, an f-divergence other than "
                "reverse_kl, MoE router losses, vision models, soft-capped logits and DDP/FSDP runs (DeepSpeed is fine) "
                "use TRL's path (logged). "
                "Logged metrics: rewards/*, logps/*, num_tokens (not entropy, logits/*, mean_token_accuracy)."})


@dataclass
class ORPOConfigWithLossType(ORPOConfig):
    """TRL's ORPOConfig plus the --loss_type field that selects it."""

    loss_type: str = field(default="orpo", metadata={"help": "orpo: odds-ratio preference optimization."})


# --loss_type values served by another TRL trainer: name -> (config class, trainer class, stage defaults)
VARIANTS = {
    "orpo": (ORPOConfigWithLossType, ORPOTrainer, {}),
    "simpo": (CPOConfig, CPOTrainer, {"cpo_alpha": 0.0}),  # SimPO = CPO's simpo loss without the BC term
    "kto": (KTOConfig, KTOTrainer, {}),  # unpaired thumbs-up/down: rated answers, or pairs split in two
}


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on pairs MedGPT has already tokenized (prompt_ids, chosen_ids, rejected_ids); with
    ``chunked_logps`` its DPO loss comes from answer log-probabilities taken in chunks (medgpt/answer_logps.py)."""

    chunked_logps = False

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "chosen_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def why_not_chunked(self) -> str | None:
        """Why the chunked DPO loss cannot serve this run (TRL's path does), or None."""
        modifiers = logit_modifiers(self.model.config)
        checks = {"--loss_type other than sigmoid": self.loss_types != ["sigmoid"],
                  "--f_divergence_type other than reverse_kl": self.f_divergence_type != "reverse_kl",
                  "--ld_alpha": self.ld_alpha is not None, "--use_weighting": self.use_weighting,
                  "--use_liger_kernel (TRL's fused loss)": self.use_liger_kernel,
                  "a MoE router loss": self.aux_loss_enabled, "a vision model": self._is_vlm,
                  # DDP/FSDP sync gradients through the wrapped model's forward, which the chunked path goes around
                  "several processes without DeepSpeed (DDP/FSDP)":
                      self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.DEEPSPEED),
                  f"logits changed after the LM head ({', '.join(modifiers)})": bool(modifiers)}
        return next((reason for reason, applies in checks.items() if applies), None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.chunked_logps or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        with self.accelerator.autocast():  # backbone and head are called outside the model's forward (and its autocast)
            chosen, rejected, ref_chosen, ref_rejected = self.pair_logps(inputs)
        chosen_rewards, rejected_rewards = self.beta * (chosen - ref_chosen), self.beta * (rejected - ref_rejected)
        loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean() * self.loss_weights[0]
        self.log_pair_metrics(mode, inputs, chosen, rejected, chosen_rewards.detach(), rejected_rewards.detach())
        return loss

    def pair_logps(self, inputs):
        """Answer log-probabilities of the policy (chosen, rejected) and of the reference (ref_chosen, ref_rejected)."""
        batch = (inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        policy = self.accelerator.unwrap_model(self.model)
        modules = backbone_and_head(policy)
        chosen, rejected = answer_logps(*modules, *batch).chunk(2)  # the batch is [chosen..., rejected...]
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                if self.ref_model is None:  # LoRA: the model with the adapter off (or a frozen "ref" adapter)
                    with use_adapter(policy, adapter_name="ref" if "ref" in policy.peft_config else None):
                        ref_chosen, ref_rejected = answer_logps(*modules, *batch).chunk(2)
                else:
                    reference = self.accelerator.unwrap_model(self.ref_model)
                    ref_chosen, ref_rejected = answer_logps(*backbone_and_head(reference), *batch).chunk(2)
        return chosen, rejected, ref_chosen, ref_rejected

    def log_pair_metrics(self, mode, inputs, chosen, rejected, chosen_rewards, rejected_rewards):
        """The metrics TRL's DPO loss logs that need no full logits, under TRL's names."""
        gather = self.accelerator.gather_for_metrics
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self._total_train_tokens]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())


def requested_loss(argv: list[str]) -> list[str]:
    """--loss_type from the command line, else from --config, before the full parse: it decides which
    trainer's config class (and so which flags: --simpo_gamma, --desirable_weight ...) the stage accepts."""
    import argparse

    import yaml

    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--loss_type", nargs="+")
    peek.add_argument("--config")
    known, _ = peek.parse_known_args(argv)
    if known.loss_type:
        return known.loss_type
    if known.config and os.path.isfile(known.config):
        with open(known.config, encoding="utf-8") as stream:
            value = (yaml.safe_load(stream) or {}).get("loss_type")
        if value:
            return value if isinstance(value, list) else [value]
    return ["sigmoid"]


def parse(argv: list[str]):
    """Parse with the config class of the trainer that serves --loss_type (DPOConfig, or ORPO's, CPO's
    (SimPO) or KTO's), so each variant's own flags work and flags it lacks are reported."""
    types = (ModelArguments, DataArguments, LoraArguments, DPOScriptArguments)
    loss = requested_loss(argv)
    variant = loss[0] if len(loss) == 1 and loss[0] in VARIANTS else None
    if any(name in VARIANTS for name in loss) and variant is None:
        raise SystemExit(f"--loss_type {' '.join(loss)}: {', '.join(VARIANTS)} cannot be combined with other losses.")
    options = dict(description=__doc__, stage="dpo")
    if variant is None:  # pairs tokenized and cut by MedGPT; TRL takes the ids
        return parse_args((*types, DPOConfig), argv, defaults={"overlong_policy": "truncate"}, **options,
                          replaced=trl_options("dataset_num_proc", "truncation_mode", "model_init_kwargs")), DPOTrainer
    config_class, trainer_class, defaults = VARIANTS[variant]
    replaced = {**trl_options("model_init_kwargs"), "chunked_logps": "it applies to DPOTrainer's losses only."}
    if variant == "kto":  # KTO's trainer tokenizes the rendered examples and cuts them to --max_length itself
        replaced.update({name: "KTO's trainer cuts over-long examples to --max_length itself."
                         for name in ("overlong_policy", "max_prompt_length")})
    return parse_args((*types, config_class), argv, defaults={"overlong_policy": "truncate", **defaults}, **options,
                      replaced=replaced), trainer_class


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    (model_args, data_args, lora_args, script_args, training_args, resolved), trainer_class = parse(argv)
    start_run(training_args, resolved)

    tokenizer = load_tokenizer(model_args)
    template = load_template(model_args, tokenizer)

    # Pairs are tokenized here with the stage's template (tool calls and reasoning included): DPOTrainer takes the
    # ids as they are; ORPO/SimPO's trainers tokenize the rendered text themselves.
    invalid = InvalidRecords.from_args(data_args, training_args.output_dir)
    train_dataset, eval_dataset, data_counts = prepare_preference_data(
        data_args, training_args, tokenizer, template, invalid,
        kind={DPOTrainer: "dpo", KTOTrainer: "kto"}.get(trainer_class, "text"),
    )
    data_counts.update(invalid.finish("preference data"))
    if trainer_class is DPOTrainer:
        trainer_class = PretokenizedDPOTrainer

    model = load_model(model_args, lora_args, gradient_checkpointing=training_args.gradient_checkpointing,
                       mixed_precision=training_args.bf16)
    extra = {}
    if issubclass(trainer_class, (DPOTrainer, KTOTrainer)) and not lora_args.use_peft:
        # A frozen copy of the starting model (with any earlier adapter merged, as the policy has it).
        extra["ref_model"] = load_model(model_args, None, training=False)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        **extra,
    )
    if trainer_class is PretokenizedDPOTrainer and script_args.chunked_logps:
        reason = trainer.why_not_chunked()
        trainer.chunked_logps = reason is None
        logger.info("DPO loss from answer log-probabilities in chunks (--chunked_logps)" if reason is None else
                    f"--chunked_logps does not apply with {reason}: TRL's full-logits path is used")
    adapter_inputs_in_bf16(trainer)
    train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    save_model(trainer, tokenizer, template, training_args.output_dir)  # before any report
    metrics = dict(train_result.metrics)
    metrics["chunked_logps"] = bool(getattr(trainer, "chunked_logps", False))
    loss = training_args.loss_type
    metrics["loss_type"] = loss if isinstance(loss, str) else ",".join(loss)
    metrics.update(data_counts)
    if eval_dataset is not None:
        metrics.update(final_eval_metrics(trainer, perplexity=False))
        logger.info(
            "Held-out reward accuracy %.3f, margin %.3f",
            metrics.get("eval_rewards/accuracies", float("nan")), metrics.get("eval_rewards/margins", float("nan")),
        )
    finish_run(trainer, metrics, training_args.output_dir)
    return metrics


if __name__ == "__main__":
    run_cli(main)
