"""On-policy distillation (OPD): a stronger teacher supervises the student on the student's own answers.

The student answers the prompts of SFT-format data itself (a share --lmbda of the batches; the rest uses
the data's own answers, off-policy) and is trained to match the teacher's next-token distribution on
them, token by token, with TRL's GKDTrainer: --beta chooses the divergence (0 forward KL, 1 reverse KL,
in between the generalized Jensen-Shannon divergence), --temperature softens both distributions,
--max_new_tokens bounds the student's answers. The student is trained in full, with LoRA or QLoRA like
every stage; the teacher (a full or merged model, optionally 4/8-bit) stays frozen and must share the
student's tokenizer. The held-out divergence student-to-teacher and the student's loss on the held-out
answers are measured before and after training.

Example (the embedded model as teacher, a student made of half its layers):
    python -m medgpt.student --num_layers 15 --output_dir outputs/student
    python opd_training.py --config configs/opd.yaml

Outputs in --output_dir: the student (adapter or full model), tokenizer, medgpt_config.yaml,
metrics.json (eval_divergence_before/after, eval_answer_loss_before/after), loss.png.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKD lives in trl.experimental in TRL 1.12
import torch  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from medgpt.args import DataArguments, LoraArguments, ModelArguments, looks_like_a_path, parse_args, run_cli, trl_options  # noqa: E402
from medgpt.data_files import InvalidRecords  # noqa: E402
from medgpt.modeling import load_model, load_template, load_tokenizer  # noqa: E402
from medgpt.tokenization import prepare_distillation_data, tokenizer_id  # noqa: E402
from medgpt.training import finish_run, resolve_resume, save_model, start_run  # noqa: E402

logger = logging.getLogger("medgpt.opd")


@dataclass
class TeacherArguments:
    """The frozen teacher."""

    teacher_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The teacher: a full or merged model folder (or hub name) with the student's tokenizer. Default: the "
                "embedded SmolLM2-135M-Instruct."})
    teacher_load_in_4bit: bool = field(default=False, metadata={"help": "Load the teacher in 4-bit (bitsandbytes)."})
    teacher_load_in_8bit: bool = field(default=False, metadata={"help": "Load the teacher in 8-bit (bitsandbytes)."})
    eval_batch_size: int = field(default=4, metadata={"help": "Held-out conversations per batch when measuring."})

    def __post_init__(self):
        if self.teacher_model_name_or_path and looks_like_a_path(self.teacher_model_name_or_path) and not os.path.exists(self.teacher_model_name_or_path):
            raise ValueError(f"--teacher_model_name_or_path {self.teacher_model_name_or_path}: no such folder.")


class DistillationCollator:
    """Pads prompt+answer rows (labels on the answer only) and the prompts alone (left-padded, for the
    student's own generations): the inputs GKDTrainer takes."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        full = [row["prompt_ids"] + row["chosen_ids"] for row in rows]
        width, prompt_width = max(map(len, full)), max(len(row["prompt_ids"]) for row in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": [], "prompts": [], "prompt_attention_mask": []}
        for row, ids in zip(rows, full):
            pad, prompt_pad = width - len(ids), prompt_width - len(row["prompt_ids"])
            batch["input_ids"].append(ids + [self.pad] * pad)
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
            batch["labels"].append([-100] * len(row["prompt_ids"]) + row["chosen_ids"] + [-100] * pad)
            batch["prompts"].append([self.pad] * prompt_pad + row["prompt_ids"])
            batch["prompt_attention_mask"].append([0] * prompt_pad + [1] * len(row["prompt_ids"]))
        return {key: torch.tensor(value) for key, value in batch.items()}


@torch.no_grad()
def measure(student, teacher, dataset, collator, beta: float, temperature: float, batch_size: int) -> dict:
    """Held-out divergence student-to-teacher (the training loss, on the data's own answers) and the
    student's cross-entropy on those answers, averaged over answer tokens."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    divergence = loss = tokens = 0.0
    for start in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collator([dataset[i] for i in
                                                       range(start, min(start + batch_size, len(dataset)))]).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student_logits = student(**inputs).logits[:, :-1].float()
        teacher_logits = teacher(**inputs).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        count = (labels != -100).sum().item()
        divergence += GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                                      temperature=temperature, reduction="sum").item()
        loss += torch.nn.functional.cross_entropy(student_logits.transpose(1, 2), labels, ignore_index=-100,
                                                  reduction="sum").item()
        tokens += count
    student.train(was_training)
    return {"divergence": divergence / max(tokens, 1), "answer_loss": loss / max(tokens, 1), "tokens": int(tokens)}


# GKDConfig's data options for work this stage does itself (refused, see parse_args).
OPD_REPLACED = ("dataset_num_proc", "dataset_text_field", "dataset_kwargs", "chat_template_path", "eos_token",
                "truncation_mode", "packing", "packing_strategy", "eval_packing", "shuffle_dataset",
                "assistant_only_loss", "completion_only_loss", "padding_free", "model_init_kwargs",
                "teacher_model_init_kwargs")


def parse(argv: list[str] | None = None):
    """The stage's arguments from --config and the command line."""
    return parse_args((ModelArguments, DataArguments, LoraArguments, TeacherArguments, GKDConfig), argv,
                      description=__doc__, stage="opd", replaced=trl_options(*OPD_REPLACED))


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, lora_args, teacher_args, training_args, resolved = parse(argv)
    start_run(training_args, resolved)

    tokenizer = load_tokenizer(model_args)
    teacher_model_args = ModelArguments(model_name_or_path=teacher_args.teacher_model_name_or_path,
                                        load_in_4bit=teacher_args.teacher_load_in_4bit,
                                        load_in_8bit=teacher_args.teacher_load_in_8bit,
                                        torch_dtype=model_args.torch_dtype, trust_remote_code=model_args.trust_remote_code)
    teacher_tokenizer = load_tokenizer(teacher_model_args)
    if tokenizer_id(teacher_tokenizer) != tokenizer_id(tokenizer):
        raise SystemExit(
            f"--teacher_model_name_or_path {teacher_args.teacher_model_name_or_path}: its tokenizer differs from the "
            "student's, so their next-token distributions cannot be compared token by token. Use a teacher of the "
            "student's family (same tokenizer), or distill off-policy: let the teacher answer the prompts "
            "(inference.py --data_file ...) and train the student on its answers with supervised_finetuning.py.")
    template = load_template(model_args, tokenizer)

    # Prompts (and their own answers, for the off-policy share) from SFT-format data, tokenized like SFT.
    invalid = InvalidRecords.from_args(data_args, training_args.output_dir)
    train_dataset, eval_dataset, data_counts = prepare_distillation_data(
        data_args, training_args, tokenizer, template, invalid)
    data_counts.update(invalid.finish("distillation prompts"))

    model = load_model(model_args, lora_args, gradient_checkpointing=training_args.gradient_checkpointing)
    teacher = load_model(teacher_model_args, None, training=False)
    collator = DistillationCollator(tokenizer.pad_token_id)
    metrics = {**data_counts, "lmbda": training_args.lmbda, "beta": training_args.beta}
    if eval_dataset is not None:
        before = measure(model, teacher, eval_dataset, collator, training_args.beta, training_args.temperature,
                         teacher_args.eval_batch_size)
        metrics.update({"eval_divergence_before": before["divergence"], "eval_answer_loss_before": before["answer_loss"]})
        logger.info("Before: held-out divergence to the teacher %.4f, answer loss %.4f", before["divergence"],
                    before["answer_loss"])

    training_args.dataset_kwargs = {"skip_prepare_dataset": True}  # tokenized above, by the stage's template
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=training_args, train_dataset=train_dataset,
                         processing_class=tokenizer, data_collator=collator)
    train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    save_model(trainer, tokenizer, template, training_args.output_dir)  # before any report
    metrics.update(train_result.metrics)
    if eval_dataset is not None:
        after = measure(trainer.model, teacher, eval_dataset, collator, training_args.beta, training_args.temperature,
                        teacher_args.eval_batch_size)
        metrics.update({"eval_divergence": after["divergence"], "eval_answer_loss": after["answer_loss"],
                        "eval_answer_perplexity": math.exp(min(after["answer_loss"], 50))})
        logger.info("After: held-out divergence to the teacher %.4f (before %.4f), answer loss %.4f (before %.4f)",
                    after["divergence"], metrics["eval_divergence_before"], after["answer_loss"],
                    metrics["eval_answer_loss_before"])
    finish_run(trainer, metrics, training_args.output_dir)
    return metrics


if __name__ == "__main__":
    run_cli(main)
