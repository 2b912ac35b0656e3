"""Stage 3 (DPO): direct preference optimization of the SFT model, and its variants.

Learns from preference pairs without a reward model (TRL's DPOTrainer). The variants are flags:
`--loss_type` takes any DPO loss TRL offers (sigmoid = DPO, ipo, hinge, robust, bco_pair,
sppo_hard, nca_pair, aot, apo_zero, apo_down, discopop, ...) plus `orpo` (TRL's ORPO trainer,
no reference model), `simpo` (TRL's CPO trainer with the SimPO loss, reference-free) and `kto`
(TRL's KTOTrainer on unpaired feedback: conversations whose last answer has "label": true|false,
or pairs split into a desirable and an undesirable answer). Each variant takes its trainer's own flags
(--simpo_gamma, --desirable_weight ...).
With LoRA the reference model is the SFT model itself with the new adapter switched off, so no
second copy sits in memory; full fine-tuning loads a frozen copy as reference.

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
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args, run_cli, trl_options  # noqa: E402
from medgpt.data_files import InvalidRecords
from medgpt.modeling import adapter_inputs_in_bf16, load_model, load_template, load_tokenizer
from medgpt.tokenization import prepare_preference_data
from medgpt.training import final_eval_metrics, finish_run, resolve_resume, save_model, start_run

logger = logging.getLogger("medgpt.dpo")


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
    """DPOTrainer on pairs MedGPT has already tokenized (prompt_ids, chosen_ids, rejected_ids)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "chosen_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


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
    types = (ModelArguments, DataArguments, LoraArguments)
    loss = requested_loss(argv)
    variant = loss[0] if len(loss) == 1 and loss[0] in VARIANTS else None
    if any(name in VARIANTS for name in loss) and variant is None:
        raise SystemExit(f"--loss_type {' '.join(loss)}: {', '.join(VARIANTS)} cannot be combined with other losses.")
    options = dict(description=__doc__, stage="dpo")
    if variant is None:  # pairs tokenized and cut by MedGPT; TRL takes the ids
        return parse_args((*types, DPOConfig), argv, defaults={"overlong_policy": "truncate"}, **options,
                          replaced=trl_options("dataset_num_proc", "truncation_mode", "model_init_kwargs")), DPOTrainer
    config_class, trainer_class, defaults = VARIANTS[variant]
    replaced = trl_options("model_init_kwargs")
    if variant == "kto":  # KTO's trainer tokenizes the rendered examples and cuts them to --max_length itself
        replaced.update({name: "KTO's trainer cuts over-long examples to --max_length itself."
                         for name in ("overlong_policy", "max_prompt_length")})
    return parse_args((*types, config_class), argv, defaults={"overlong_policy": "truncate", **defaults}, **options,
                      replaced=replaced), trainer_class


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    (model_args, data_args, lora_args, training_args, resolved), trainer_class = parse(argv)
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
    adapter_inputs_in_bf16(trainer)
    train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    save_model(trainer, tokenizer, template, training_args.output_dir)  # before any report
    metrics = dict(train_result.metrics)
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
