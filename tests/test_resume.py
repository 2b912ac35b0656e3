"""A stopped run loses at most the work since its last checkpoint, a finished one nothing.

Every resumable stage continues a stopped run from its checkpoint on the same curve (SFT's resume,
including after SIGKILL, is in test_sft.py; PPO refuses to resume, see test_rl.py), and every stage
saves its trained model before anything after training can fail.
"""

import json
import re
import shutil

import pytest

from conftest import sft_records, write_jsonl
from medgpt.args import DataArguments, LoraArguments, ModelArguments

COMMON = ["--logging_steps", "1", "--report_to", "none", "--gradient_checkpointing", "false", "--seed", "5",
          "--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no", "--learning_rate", "1e-2"]


def pretraining_args(tiny_model_dir, data):
    write_jsonl(data / "text.jsonl", [{"text": f"Note {i}: anaemia lowers haemoglobin; check ferritin. " * 4}
                                      for i in range(24)])
    return ["--model_name_or_path", str(tiny_model_dir), "--train_files", str(data / "text.jsonl"),
            "--block_size", "32", "--per_device_train_batch_size", "2", "--validation_split_percentage", "0"]


def preference_args(tiny_model_dir, data, preference_dir):
    return ["--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(preference_dir / "train"),
            "--max_length", "256", "--per_device_train_batch_size", "2", "--validation_split_percentage", "0"]


def grpo_args(tiny_model_dir, data):
    write_jsonl(data / "q.jsonl", [{"question": f"Question {i}: which vitamin deficiency causes scurvy?",
                                    "options": {"A": "Vitamin A", "B": "Vitamin C", "C": "Vitamin D"}, "answer": "B"}
                                   for i in range(8)])
    return ["--model_name_or_path", str(tiny_model_dir), "--train_files", str(data / "q.jsonl"),
            "--num_generations", "4", "--per_device_train_batch_size", "4", "--max_completion_length", "8",
            "--validation_split_percentage", "0", "--reward_functions", "accuracy"]


def open_questions_args(tiny_model_dir, data):
    """GRPO on questions that have no options: the multiple-choice reward has no value to log."""
    write_jsonl(data / "q.jsonl", [{"question": f"Case {i}: which vitamin deficiency causes scurvy?",
                                    "answer": "Vitamin C"} for i in range(4)])
    return ["--model_name_or_path", str(tiny_model_dir), "--train_files", str(data / "q.jsonl"),
            "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "4",
            "--validation_split_percentage", "0", "--logging_steps", "10"]  # logged once, after training


def sft_args(tiny_model_dir, data):
    write_jsonl(data / "c.jsonl", sft_records(4))
    return ["--model_name_or_path", str(tiny_model_dir), "--train_files", str(data / "c.jsonl"),
            "--validation_split_percentage", "0", "--per_device_train_batch_size", "2"]


STAGES = {
    "pretraining": lambda model, data, pref: pretraining_args(model, data),
    "reward_modeling": lambda model, data, pref: preference_args(model, data, pref),
    "dpo_training": lambda model, data, pref: preference_args(model, data, pref),
    "grpo_training": lambda model, data, pref: grpo_args(model, data),
}


def logged(directory) -> dict[int, dict]:
    history = json.loads((directory / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in history if "loss" in entry}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(STAGES))
def test_stage_resumes_from_its_checkpoint_on_the_same_curve(script, tiny_model_dir, preference_dir, tmp_path,
                                                             caplog):
    import importlib

    main = importlib.import_module(script).main
    (tmp_path / "data").mkdir()
    args = STAGES[script](tiny_model_dir, tmp_path / "data", preference_dir)
    out = tmp_path / "out"
    main([*args, *COMMON, "--output_dir", str(out)])
    whole = logged(out)
    assert sorted(whole) == [1, 2, 3, 4] and (out / "checkpoint-2" / "trainer_state.json").is_file()

    if script == "pretraining":  # as if the run had died while writing checkpoint-4: skipped, named
        weights = out / "checkpoint-4" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:  # as if the run had died after step 3: its last checkpoint is step 2
        shutil.rmtree(out / "checkpoint-4")
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][0]["resumed_from_here"] = True  # shows up only if the run continues from this state
    state_file.write_text(json.dumps(state))
    caplog.clear()
    main([*args, *COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "auto"])
    if script == "pretraining":
        assert f"Skipping checkpoint {out / 'checkpoint-4'}: adapter_model.safetensors is damaged" in caplog.text
    resumed = logged(out)
    assert sorted(resumed) == [1, 2, 3, 4] and (out / "checkpoint-4").is_dir()
    assert resumed[1].get("resumed_from_here"), "steps 1-2 were trained again instead of resumed"
    for step in (3, 4):  # trained again after the resume: the same numbers as before
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-4, abs=1e-6), step
        assert resumed[step]["learning_rate"] == pytest.approx(whole[step]["learning_rate"]), step


REPORTING_STAGES = {
    "pretraining": lambda model, data, pref, rm: pretraining_args(model, data),
    "supervised_finetuning": lambda model, data, pref, rm: sft_args(model, data),
    "reward_modeling": lambda model, data, pref, rm: preference_args(model, data, pref),
    "dpo_training": lambda model, data, pref, rm: preference_args(model, data, pref),
    "grpo_training": lambda model, data, pref, rm: open_questions_args(model, data),
    "ppo_training": lambda model, data, pref, rm: [
        *sft_args(model, data), "--reward_model_path", str(rm), "--total_episodes", "2", "--num_mini_batches", "1",
        "--num_ppo_epochs", "1", "--response_length", "4", "--num_sample_generations", "0"],
    "opd_training": lambda model, data, pref, rm: [
        *sft_args(model, data), "--teacher_model_name_or_path", str(model), "--max_new_tokens", "4"],
}


def record_flag_reads(module, monkeypatch) -> set[str]:
    """The names of MedGPT's own flags (ModelArguments, DataArguments, LoraArguments, a stage's script
    arguments) that the stage reads after parsing, filled in as it runs."""
    import dataclasses

    from medgpt import args as medgpt_args

    reads: set[str] = set()
    parse = module.parse_args

    def parse_and_record(types, *args, **kwargs):
        parsed = parse(types, *args, **kwargs)
        for dtype in types:
            if dtype.__module__.startswith(("trl", "transformers")):
                continue
            names = {item.name for item in dataclasses.fields(dtype)}

            def get(self, name, names=names):
                if name in names:
                    reads.add(name)
                return object.__getattribute__(self, name)

            monkeypatch.setattr(dtype, "__getattribute__", get)
        return parsed

    monkeypatch.setattr(module, "parse_args", parse_and_record)
    assert medgpt_args.parse_args is parse  # the stage parses through the one shared function
    return reads


@pytest.mark.slow
@pytest.mark.parametrize("script", list(REPORTING_STAGES))
def test_a_stage_reads_every_flag_it_shows_and_a_failing_report_never_costs_the_model(
        script, tiny_model_dir, preference_dir, reward_model_dir, tmp_path, monkeypatch, capsys):
    """One short run per stage checks two promises. Whatever fails after training (here the Trainer's metric
    logging and the plot) comes after the model is saved. And every MedGPT flag in the stage's --help is read
    by it (a flag that only matters with another one, e.g. --shuffle_buffer_size with --streaming, declares
    so): an accepted flag that does nothing would be a silent failure (flags a stage does not read are
    hidden and refused, see test_cli.py)."""
    import dataclasses
    import importlib

    import transformers

    import medgpt.training

    def broken(*args, **kwargs):
        raise RuntimeError("report failed")

    monkeypatch.setattr(transformers.Trainer, "log_metrics", broken)
    monkeypatch.setattr(medgpt.training, "plot_loss", broken)
    module = importlib.import_module(script)
    reads = record_flag_reads(module, monkeypatch)
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    args = REPORTING_STAGES[script](tiny_model_dir, tmp_path / "data", preference_dir, reward_model_dir)
    steps = [] if script == "ppo_training" else ["--max_steps", "1"]  # PPO counts --total_episodes
    metrics = module.main([*COMMON[:6], *args, *steps, "--save_strategy", "no", "--output_dir", str(out)])
    weights = {"reward_modeling": "model.safetensors"}.get(script, "adapter_model.safetensors")
    assert (out / weights).is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    if script == "grpo_training":  # no question had options: that reward has no mean, and says so
        assert metrics["rewards/choice_accuracy_reward/mean"] is None

    with pytest.raises(SystemExit):
        module.main(["--help"])
    shown = set(re.findall(r"^  --(\w+)", capsys.readouterr().out, flags=re.M))
    fields = {item.name: item for dtype in (ModelArguments, DataArguments, LoraArguments)
              for item in dataclasses.fields(dtype)}
    conditional = {name for name, item in fields.items() if item.metadata.get("requires")}
    unread = sorted((shown & set(fields)) - reads - conditional)
    assert not unread, f"{script} shows flags it never reads: {unread}"


def test_a_damaged_checkpoint_is_named_and_passed_over(tmp_path):
    import torch

    from medgpt.training import checkpoint_problem, newest_complete_checkpoint, resolve_resume

    for step in (2, 4, 10):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        torch.save({"step": torch.zeros(1000)}, folder / "optimizer.pt")
    optimizer = tmp_path / "checkpoint-10" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-200])  # a save cut short
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()  # never finished
    assert checkpoint_problem(tmp_path / "checkpoint-10").startswith("optimizer.pt is damaged")
    assert newest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")

    class Args:
        output_dir, resume_from_checkpoint = str(tmp_path), str(tmp_path / "checkpoint-10")

    with pytest.raises(SystemExit, match=r"checkpoint-10: optimizer.pt is damaged .*Pass another checkpoint"):
        resolve_resume(Args)
