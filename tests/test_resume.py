"""Every resumable stage continues a stopped run from its checkpoint on the same curve.

(SFT's resume, including after SIGKILL, is in test_sft.py; PPO refuses to resume, see test_rl.py.)
"""

import json
import shutil

import pytest

from conftest import write_jsonl

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
def test_stage_resumes_from_its_checkpoint_on_the_same_curve(script, tiny_model_dir, preference_dir, tmp_path):
    import importlib

    main = importlib.import_module(script).main
    (tmp_path / "data").mkdir()
    args = STAGES[script](tiny_model_dir, tmp_path / "data", preference_dir)
    out = tmp_path / "out"
    main([*args, *COMMON, "--output_dir", str(out)])
    whole = logged(out)
    assert sorted(whole) == [1, 2, 3, 4] and (out / "checkpoint-2" / "trainer_state.json").is_file()

    shutil.rmtree(out / "checkpoint-4")  # as if the run had died after step 3: its last checkpoint is step 2
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][0]["resumed_from_here"] = True  # shows up only if the run continues from this state
    state_file.write_text(json.dumps(state))
    main([*args, *COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "auto"])
    resumed = logged(out)
    assert sorted(resumed) == [1, 2, 3, 4] and (out / "checkpoint-4").is_dir()
    assert resumed[1].get("resumed_from_here"), "steps 1-2 were trained again instead of resumed"
    for step in (3, 4):  # trained again after the resume: the same numbers as before
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-4, abs=1e-6), step
        assert resumed[step]["learning_rate"] == pytest.approx(whole[step]["learning_rate"]), step
