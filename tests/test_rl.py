"""PPO and GRPO end to end on tiny models; their data readers."""

import json

import pytest
import torch

from conftest import run_script, sft_records, write_jsonl
from medgpt.data_files import json_reader, qa_reader
from medgpt.records import DataError, qa_item_from_record, question_from_record

COMMON = ["--logging_steps", "1", "--report_to", "none", "--gradient_checkpointing", "false", "--seed", "5"]


def mcq(i: int, answer: str = "B") -> dict:
    return {"question": f"Which drug is first-line for type 2 diabetes? ({i})",
            "options": {"A": "Insulin", "B": "Metformin", "C": "Warfarin", "D": "Aspirin"}, "answer": answer}


def test_question_records_render_options_and_instructions():
    item = question_from_record(mcq(0))
    assert item["kind"] == "choice" and item["answer"] == "B"
    text = item["prompt"][-1]["content"]
    assert "\nA. Insulin\nB. Metformin" in text and 'Answer: <option letter(s)>' in text
    open_item = question_from_record({"question": "缺铁最常见的贫血类型是？", "answer": "缺铁性贫血"})
    assert open_item["kind"] == "open" and "答案：<简短答案>" in open_item["prompt"][-1]["content"]
    inline = question_from_record({"question": "Pick one: A. x B. y", "answer": "b"})
    assert inline["kind"] == "choice" and inline["answer"] == "B"
    multi = question_from_record({**mcq(1), "answer": "D, A"})
    assert multi["answer"] == "AD"


@pytest.mark.parametrize("record, message", [
    ({"question": "q"}, "no 'answer'"),
    ({**mcq(0), "answer": "E"}, "not one of the option letters"),
    ({**mcq(0), "options": {"1": "x", "2": "y"}}, "option keys must be letters"),
    ({**mcq(0), "options": {}}, "'options' must be"),
])
def test_bad_question_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "q.jsonl", [mcq(0), record])
    with pytest.raises(DataError) as error:
        json_reader(question_from_record)([path])
    assert f"{path}:2:" in str(error.value) and message in str(error.value)


def test_prompts_from_every_format(tmp_path):
    sft = sft_records(4)
    item = qa_item_from_record(sft[1])
    assert item["messages"][-1] == {"role": "user", "content": "And if it gets worse?"}
    assert item["reference"].startswith("See a doctor")
    assert qa_item_from_record(sft[2])["messages"][0]["content"] == "你好"  # Alpaca history kept
    assert qa_item_from_record({"question": "q"}) == {"messages": [{"role": "user", "content": "q"}]}
    pair = qa_item_from_record({"prompt": "p", "chosen": "a", "rejected": "b"})
    assert pair == {"messages": [{"role": "user", "content": "p"}], "reference": "a"}
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "third"}])
    prompts = qa_reader([tmp_path / "p.txt", tmp_path / "p.jsonl"])
    assert [item["messages"][-1]["content"] for _, item in prompts] == ["first prompt", "second prompt", "third"]


@pytest.mark.slow
def test_ppo_short_run_logs_reward_kl_value_and_policy_loads(tiny_model_dir, reward_model_dir, tmp_path):
    import ppo_training

    prompts = write_jsonl(tmp_path / "prompts.jsonl", sft_records(8))
    out = tmp_path / "ppo"
    metrics = ppo_training.main([
        "--model_name_or_path", str(tiny_model_dir), "--reward_model_path", str(reward_model_dir),
        "--train_files", str(prompts), "--validation_split_percentage", "25", "--output_dir", str(out),
        "--total_episodes", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--num_mini_batches", "1", "--num_ppo_epochs", "1", "--response_length", "8", "--stop_token", "eos",
        "--num_sample_generations", "0", "--save_strategy", "no", "--learning_rate", "1e-3", *COMMON,
    ])
    assert metrics["steps"] == 2
    for key in ("objective/scores", "objective/kl", "loss/value_avg"):
        assert torch.isfinite(torch.tensor(metrics[f"{key}_last"]))
    assert (out / "adapter_config.json").is_file() and (out / "loss.png").is_file()
    questions = tmp_path / "q.txt"
    questions.write_text("What is a fever?\n")
    run_script("inference.py", "--base_model", str(tiny_model_dir), "--lora_model", str(out), "--data_file",
               str(questions), "--output_file", str(tmp_path / "a.jsonl"), "--max_new_tokens", "4")
    assert json.loads((tmp_path / "a.jsonl").read_text())["question"] == "What is a fever?"


def test_ppo_needs_a_local_reward_model(tiny_model_dir, tmp_path):
    import ppo_training

    with pytest.raises(SystemExit, match="--reward_model_path is required"):
        ppo_training.main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a model folder"):
        ppo_training.main(["--model_name_or_path", str(tiny_model_dir), "--reward_model_path", str(tmp_path),
                           "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a reward model .*LlamaForCausalLM.*reward_modeling.py"):
        ppo_training.main(["--model_name_or_path", str(tiny_model_dir), "--reward_model_path", str(tiny_model_dir),
                           "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--max_steps 3: TRL's PPO does not read it.*--total_episodes"):
        ppo_training.main(["--model_name_or_path", str(tiny_model_dir), "--reward_model_path", str(tiny_model_dir),
                           "--output_dir", str(tmp_path), "--max_steps", "3"])
    with pytest.raises(SystemExit, match="PPO runs cannot resume.*--adapter_name_or_path CHECKPOINT"):
        ppo_training.main(["--model_name_or_path", str(tiny_model_dir), "--reward_model_path", str(tiny_model_dir),
                           "--output_dir", str(tmp_path), "--resume_from_checkpoint", "auto"])


@pytest.mark.slow
def test_grpo_with_accuracy_reward(tiny_model_dir, tmp_path):
    import grpo_training

    write_jsonl(tmp_path / "train" / "q.jsonl", [mcq(i) for i in range(4)] + [{"question": "贫血？", "answer": "缺铁性贫血"}])
    write_jsonl(tmp_path / "eval" / "q.jsonl", [mcq(9, "C"), {"question": "最常见的卒中类型？", "answer": "缺血性卒中"}])
    out = tmp_path / "grpo"
    metrics = grpo_training.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(tmp_path / "train"),
        "--validation_file_dir", str(tmp_path / "eval"), "--output_dir", str(out), "--max_steps", "2",
        "--num_generations", "4", "--per_device_train_batch_size", "4", "--max_completion_length", "8",
        "--eval_max_new_tokens", "6", "--reward_functions", "accuracy,open_answer", "--save_strategy", "no", *COMMON,
    ])
    assert metrics["train_questions"] == 5 and metrics["eval_n"] == 2
    assert {"eval_accuracy_before", "eval_accuracy", "eval_choice_accuracy", "eval_open_accuracy"} <= set(metrics)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "reward" in entry]
    assert len(logged) == 2 and all("rewards/choice_accuracy_reward/mean" in entry for entry in logged)
    assert (out / "adapter_config.json").is_file()


def test_grpo_rejects_unknown_reward_and_bad_weights(tiny_model_dir, tmp_path):
    import grpo_training

    with pytest.raises(SystemExit, match="unknown"):
        grpo_training.main(["--model_name_or_path", str(tiny_model_dir), "--reward_functions", "accuracy,bleu",
                            "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--reward_weights has 1 numbers for 2 rewards"):
        grpo_training.main(["--model_name_or_path", str(tiny_model_dir), "--reward_functions", "accuracy,format",
                            "--reward_weights", "1.0", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--reward_model_path .*: not a reward model"):
        grpo_training.main(["--model_name_or_path", str(tiny_model_dir), "--reward_functions", "accuracy",
                            "--reward_model_path", str(tiny_model_dir), "--output_dir", str(tmp_path)])
