"""Newer methods: the LoRA family (DoRA, rsLoRA, PiSSA/OLoRA init, freeze tuning), KTO, every variant's flags."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import preference_records, sft_records, write_jsonl

COMMON = ["--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1", "--logging_steps", "1",
          "--report_to", "none", "--gradient_checkpointing", "false", "--seed", "3", "--save_strategy", "no",
          "--dataloader_num_workers", "0", "--max_length", "128", "--bf16", "false", "--use_cpu", "true"]


# ---------------------------------------------------------------- every variant's own hyperparameters


@pytest.mark.parametrize("flags, attribute, value", [
    (["--loss_type", "simpo", "--simpo_gamma", "0.7"], "simpo_gamma", 0.7),
    (["--loss_type", "simpo", "--cpo_alpha", "0.2"], "cpo_alpha", 0.2),
    (["--loss_type", "orpo", "--beta", "0.3"], "beta", 0.3),
    (["--loss_type", "kto", "--desirable_weight", "1.5"], "desirable_weight", 1.5),
    (["--loss_type", "kto", "--undesirable_weight", "0.5"], "undesirable_weight", 0.5),
    (["--loss_type", "ipo", "--beta", "0.4"], "beta", 0.4),
    (["--loss_type", "sigmoid", "--label_smoothing", "0.1"], "label_smoothing", 0.1),
])
def test_every_variant_takes_its_own_flags(tmp_path, flags, attribute, value):
    import dpo_training

    (*_, config, _), trainer = dpo_training.parse([*flags, "--output_dir", str(tmp_path)])
    assert getattr(config, attribute) == value
    assert trainer.__name__.startswith({"simpo": "CPO", "orpo": "ORPO", "kto": "KTO"}.get(flags[1], "DPO"))


def test_variant_flags_come_from_the_config_file_too_and_foreign_flags_are_refused(tmp_path):
    import dpo_training

    config = tmp_path / "kto.yaml"
    config.write_text("loss_type: kto\ndesirable_weight: 1.3\n")
    (*_, parsed, _), trainer = dpo_training.parse(["--config", str(config), "--output_dir", str(tmp_path)])
    assert trainer.__name__ == "KTOTrainer" and parsed.desirable_weight == 1.3
    with pytest.raises(SystemExit):  # SimPO's gamma means nothing to KTO: refused, not ignored
        dpo_training.parse(["--loss_type", "kto", "--simpo_gamma", "0.7", "--output_dir", str(tmp_path)])


# ---------------------------------------------------------------- KTO


@pytest.mark.slow
def test_kto_learns_from_rated_answers_and_split_pairs(tiny_model_dir, tmp_path):
    import dpo_training

    rated = []
    for i in range(6):
        rated.append({"messages": [{"role": "user", "content": f"Chest pain and sweating ({i})?"},
                                   {"role": "assistant", "content": "Call emergency services now."}], "label": True})
        rated.append({"conversations": [{"from": "human", "value": f"Chest pain and sweating ({i})?"},
                                        {"from": "gpt", "value": "Sleep it off."}], "label": False})
    data = write_jsonl(tmp_path / "kto.jsonl", rated + preference_records(4))
    out = tmp_path / "kto"
    metrics = dpo_training.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_files", str(data), "--validation_files", str(data),
        "--output_dir", str(out), "--loss_type", "kto", "--max_steps", "8", "--learning_rate", "1e-2",
        "--beta", "0.5", *COMMON])
    # the policy starts as its reference (rewards and KL 0): the KTO loss is 0.5 per example; it must fall
    assert metrics["eval_loss"] < 0.45, metrics["eval_loss"]
    assert metrics["train_kto_examples"] == 20 and metrics["train_kto_desirable"] == 10
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": rated[0]["messages"], "label": "good"}])
    from medgpt.records import DataError

    with pytest.raises(DataError, match=f"{bad}:1: a KTO example is a preference pair"):
        dpo_training.main(["--model_name_or_path", str(tiny_model_dir), "--train_files", str(bad), "--output_dir",
                           str(tmp_path / "bad"), "--loss_type", "kto", "--max_steps", "1", *COMMON])


# ---------------------------------------------------------------- the LoRA family and freeze tuning


def eval_loss(model, tokenizer, path) -> float:
    """The mean over conversations of each one's token-mean loss (what the Trainer reports with batch size 1)."""
    from medgpt.data_files import raw_records
    from medgpt.tokenization import build_sft_dataset
    from template import get_template

    dataset, _ = build_sft_dataset(raw_records([path]), tokenizer, get_template(None, tokenizer), 128, "skip")
    losses = []
    with torch.no_grad():
        for row in dataset:
            losses.append(model(input_ids=torch.tensor([row["input_ids"]]),
                                labels=torch.tensor([row["labels"]])).loss.item())
    return sum(losses) / len(losses)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--use_dora", "true", "--use_rslora", "true", "--init_lora_weights", "gaussian"],
                                   ["--init_lora_weights", "pissa"], ["--init_lora_weights", "olora"]],
                         ids=["dora-rslora-gaussian", "pissa", "olora"])
def test_lora_family_trains_and_its_saved_adapter_is_the_trained_model(tiny_model_dir, tmp_path, flags):
    """The adapter as saved, on the original base model (PiSSA/OLoRA converted to plain LoRA), gives exactly the
    trained model's held-out loss, lower than the base model's; merging gives the same model again."""
    import supervised_finetuning
    from conftest import run_main
    from medgpt.args import ModelArguments
    from medgpt.generation import ChatModel

    train = write_jsonl(tmp_path / "train.jsonl", sft_records(8))
    held_out = write_jsonl(tmp_path / "eval.jsonl", sft_records(4))
    out = tmp_path / "adapter"
    metrics = supervised_finetuning.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_files", str(train), "--validation_files", str(held_out),
        "--output_dir", str(out), "--max_steps", "6", "--learning_rate", "1e-2", "--packing", "false", *COMMON,
        *flags])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] == config["use_rslora"] == ("--use_dora" in flags)
    base = ChatModel.load(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    trained = ChatModel.load(ModelArguments(model_name_or_path=str(tiny_model_dir), adapter_name_or_path=str(out)))
    before, after = eval_loss(base.model, base.tokenizer, held_out), eval_loss(trained.model, trained.tokenizer, held_out)
    assert after == pytest.approx(metrics["eval_loss"], rel=1e-3) and after < before - 0.01, (before, after)
    merged = tmp_path / "merged"
    run_main("merge_peft_adapter.py", "--base_model", str(tiny_model_dir), "--lora_model", str(out),
             "--output_dir", str(merged))
    again = ChatModel.load(ModelArguments(model_name_or_path=str(merged)))
    assert eval_loss(again.model, again.tokenizer, held_out) == pytest.approx(after, rel=1e-3)


@pytest.mark.slow
def test_freeze_tuning_trains_only_the_last_blocks(tiny_model_dir, tmp_path):
    import supervised_finetuning

    train = write_jsonl(tmp_path / "train.jsonl", sft_records(8))
    out = tmp_path / "freeze"
    supervised_finetuning.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_files", str(train), "--output_dir", str(out),
        "--validation_split_percentage", "0", "--max_steps", "3", "--learning_rate", "1e-2", "--use_peft", "false",
        "--freeze_trainable_layers", "1", *COMMON])
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.1.") for name in changed), changed
    with pytest.raises(SystemExit, match="--use_peft false"):
        supervised_finetuning.parse(["--freeze_trainable_layers", "1", "--output_dir", str(tmp_path)])


# ---------------------------------------------------------------- on-policy distillation


@pytest.mark.slow
def test_on_policy_distillation_brings_the_student_closer_to_the_teacher(tiny_model_dir, tmp_path):
    import opd_training
    import supervised_finetuning
    from conftest import run_main, run_script

    data = tmp_path / "data"
    write_jsonl(data / "train" / "a.jsonl", sft_records(16))
    write_jsonl(data / "eval" / "a.jsonl", sft_records(4))
    teacher = tmp_path / "teacher"  # a teacher that knows the answers: the tiny model trained on them in full
    supervised_finetuning.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(data / "train"), "--output_dir",
        str(teacher), "--validation_split_percentage", "0", "--max_steps", "20", "--learning_rate", "1e-2",
        "--use_peft", "false", "--packing", "false", *COMMON])
    student = tmp_path / "student"
    result = run_script("-m", "medgpt.student", "--model_name_or_path", str(teacher), "--num_layers", "1",
                        "--output_dir", str(student))
    assert "Kept blocks [0] of 2" in result.stdout
    common = ["--model_name_or_path", str(student), "--teacher_model_name_or_path", str(teacher),
              "--train_file_dir", str(data / "train"), "--validation_file_dir", str(data / "eval"),
              "--max_new_tokens", "12", "--lmbda", "0.5", "--beta", "0.5", "--temperature", "1.0", *COMMON]
    metrics = opd_training.main([*common, "--output_dir", str(tmp_path / "opd"), "--max_steps", "10",
                                 "--learning_rate", "1e-2", "--use_peft", "false"])
    assert metrics["eval_divergence"] < 0.8 * metrics["eval_divergence_before"], metrics
    assert metrics["eval_answer_loss"] < metrics["eval_answer_loss_before"], metrics
    assert (tmp_path / "opd" / "model.safetensors").is_file()
    other = tmp_path / "other-tokenizer"  # a teacher with another tokenizer is refused with the remedy
    run_main("medgpt/vocab.py", "--model_name_or_path", str(teacher), "--inputs", str(data / "train"),
             "--num_new_tokens", "4", "--min_frequency", "2", "--output_dir", str(other))
    with pytest.raises(SystemExit, match="its tokenizer differs from the student's"):
        opd_training.main([*common[:2], "--teacher_model_name_or_path", str(other), *common[4:],
                           "--output_dir", str(tmp_path / "refused"), "--max_steps", "1"])
