"""Multi-process training on CPU: two processes (gloo) under torchrun, the DeepSpeed launcher and
accelerate launch, plain DDP and DeepSpeed ZeRO; the saved model (full or LoRA) loads and generates.
Every run checks that both ranks trained (the epoch fraction counts the batches of two processes)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, sft_records, write_jsonl
from medgpt.args import ModelArguments
from medgpt.generation import ChatModel, GenerationArguments

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def free_port() -> int:
    """A port nothing listens on now (torchrun's --master_port 0 does not pick one; it hangs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return result


def sft_args(model_dir, tmp_path, use_peft: str) -> list:
    """supervised_finetuning.py for 2 steps of 2 rows per process on 16 conversations."""
    data = write_jsonl(tmp_path / "train.jsonl", sft_records(16))
    return ["supervised_finetuning.py", "--model_name_or_path", model_dir, "--train_files", data,
            "--validation_split_percentage", "0", "--output_dir", tmp_path / "out", "--max_steps", "2",
            "--max_length", "128", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--use_peft", use_peft, "--learning_rate", "1e-2",
            "--packing", "false"]  # one conversation per row: the epoch arithmetic below counts conversations


def check_trained_on_two_ranks(out, records: int) -> dict:
    """Loss logged at both steps and finite; 2 steps x 2 rows x 2 processes of the data seen."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert metrics["epoch"] == pytest.approx(2 * 2 * 2 / records), "not two processes training together"
    state = json.loads((out / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2]
    return metrics


def check_loads_and_generates(out, base_dir, lora: bool) -> None:
    """The saved folder (an adapter on base_dir, or a full model) loads, differs from base_dir and generates."""
    assert (out / "adapter_config.json").is_file() == lora
    model_args = ModelArguments(model_name_or_path=str(base_dir), adapter_name_or_path=str(out)) if lora \
        else ModelArguments(model_name_or_path=str(out))
    chat = ChatModel.load(model_args)
    trained = chat.model.state_dict()
    base = ChatModel.load(ModelArguments(model_name_or_path=str(base_dir))).model.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base if "proj" in k), "training changed no weights"
    answer = chat.generate([[{"role": "user", "content": "What is a fever?"}]], GenerationArguments(max_new_tokens=4))
    assert isinstance(answer[0], str)


def check_sft_output(out, base_dir, use_peft: str) -> None:
    check_trained_on_two_ranks(out, records=16)
    check_loads_and_generates(out, base_dir, lora=use_peft == "true")


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed, use_peft", [
    (None, "true"),
    pytest.param("zero2.json", "true", marks=pytest.mark.extended),  # ZeRO-2 SFT: the deepspeed launcher test
    ("zero3.json", "true"),
    ("zero3.json", "false"),
    pytest.param("zero3_offload.json", "true", marks=pytest.mark.extended),  # builds DeepSpeed's CPU Adam
], ids=["ddp-lora", "zero2-lora", "zero3-lora", "zero3-full", "zero3-offload-lora"])
def test_two_process_sft_saves_a_loadable_model(tiny_model_dir, tmp_path, deepspeed, use_peft):
    command = [*TORCHRUN, *sft_args(tiny_model_dir, tmp_path, use_peft)]
    if deepspeed:
        command += ["--deepspeed", deepspeed]
    launch(command)
    check_sft_output(tmp_path / "out", tiny_model_dir, use_peft)


@pytest.mark.slow
def test_deepspeed_launcher_sft_zero2(tiny_model_dir, tmp_path):
    """`deepspeed --num_gpus 2 ...` (the module behind the `deepspeed` command): on CPU it starts two
    processes with --local_rank=N and RANK/WORLD_SIZE/MASTER_* set; no CPU-specific flag is needed."""
    launch([sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", "2",
            "--master_port", free_port(), *sft_args(tiny_model_dir, tmp_path, "true"), "--deepspeed", "zero2.json"])
    check_sft_output(tmp_path / "out", tiny_model_dir, "true")


@pytest.mark.slow
@pytest.mark.parametrize("launcher_args, zero_stage", [
    pytest.param(["--multi_gpu"], None, marks=pytest.mark.extended),  # torchrun underneath: ddp-lora above
    (["--use_deepspeed", "--deepspeed_config_file", "zero3.json"], 3),
], ids=["ddp", "deepspeed-zero3"])
def test_accelerate_launch_sft(tiny_model_dir, tmp_path, launcher_args, zero_stage):
    """`accelerate launch --multi_gpu` runs torchrun underneath, which on CPU means gloo. (`--cpu
    --num_processes 2` would silently start one process.) With `--use_deepspeed` the DeepSpeed
    config comes from accelerate, not from the script's --deepspeed flag."""
    result = launch([sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_processes", "2",
                     "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
                     "--dynamo_backend", "no", *sft_args(tiny_model_dir, tmp_path, "true")])
    assert ("DeepSpeed ZeRO stage 3" in result.stderr) == (zero_stage == 3)
    check_sft_output(tmp_path / "out", tiny_model_dir, "true")


@pytest.mark.slow
@pytest.mark.parametrize("script, zero", [("dpo_training.py", 2), ("dpo_training.py", None),
                                          pytest.param("reward_modeling.py", 2, marks=pytest.mark.extended),
                                          ("reward_modeling.py", 3)])
def test_two_process_preference_stages_with_zero(tiny_model_dir, preference_dir, tmp_path, script, zero):
    """DPO (also plain DDP) and the reward model under torchrun with ZeRO, with a validation set. The Trainer cannot
    evaluate before train() under DeepSpeed, so the reward model leaves out its *_before metrics.
    Under ZeRO-3 the reward model's LoRA adapter and its trained score head share one dtype."""
    out = tmp_path / "out"
    result = launch([*TORCHRUN, script, "--model_name_or_path", tiny_model_dir,
                     "--train_file_dir", preference_dir / "train", "--validation_file_dir", preference_dir / "eval",
                     "--output_dir", out, "--max_steps", "2", "--learning_rate", "1e-2", "--max_length", "256",
                     "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--logging_steps", "1",
                     "--gradient_checkpointing", "false", "--save_strategy", "no", "--report_to", "none",
                     *(["--deepspeed", f"zero{zero}.json"] if zero else [])])
    assert (f"DeepSpeed ZeRO stage {zero}" in result.stderr) == bool(zero)
    metrics = check_trained_on_two_ranks(out, records=12)
    if script == "dpo_training.py":
        assert "eval_rewards/accuracies" in metrics
        # chunked log-probs call the backbone directly: fine under DeepSpeed (it syncs gradients itself), not
        # under plain DDP, which syncs them only through the wrapped model's forward: TRL's path there
        assert metrics["chunked_logps"] is bool(zero)
        check_loads_and_generates(out, tiny_model_dir, lora=True)
    else:
        assert "eval_accuracy" in metrics and "eval_accuracy_before" not in metrics
        assert (out / "adapter_model.safetensors").is_file()  # under DeepSpeed saved unmerged (logged)
        weights = load_file(out / "adapter_model.safetensors")
        assert any("score" in name for name in weights)  # the head is trained and saved with the adapter
        assert all(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)


def ppo_command(model_dir, reward_model_dir, tmp_path, *extra) -> list:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", sft_records(8))
    return [*TORCHRUN, "ppo_training.py", "--model_name_or_path", model_dir, "--reward_model_path", reward_model_dir,
            "--train_files", prompts, "--validation_split_percentage", "0", "--output_dir", tmp_path / "out",
            "--total_episodes", "8", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--num_mini_batches", "1", "--num_ppo_epochs", "1", "--response_length", "8", "--stop_token", "eos",
            "--num_sample_generations", "0", "--save_strategy", "no", "--learning_rate", "1e-3", "--logging_steps",
            "1", "--report_to", "none", "--gradient_checkpointing", "false", *extra]


@pytest.mark.slow
def test_two_process_ppo_with_zero3_saves_the_gathered_policy(tiny_model_dir, reward_model_dir, tmp_path):
    """TRL's PPO under DeepSpeed in two processes: 8 episodes = 2 steps of 2 prompts x 2 processes,
    and the saved adapter holds whole (gathered) trained weights that load and generate."""
    launch(ppo_command(tiny_model_dir, reward_model_dir, tmp_path, "--deepspeed", "zero3.json"))
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["episodes"] == 8
    assert torch.isfinite(torch.tensor(metrics["objective/kl_last"]))
    check_loads_and_generates(out, tiny_model_dir, lora=True)


def test_two_process_ppo_without_deepspeed_is_refused_with_the_remedy(tiny_model_dir, reward_model_dir, tmp_path):
    command = [str(part) for part in ppo_command(tiny_model_dir, reward_model_dir, tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "add --deepspeed zero2.json" in result.stderr


@pytest.mark.slow
def test_two_process_grpo_with_zero2(tiny_model_dir, tmp_path):
    """GRPO in two processes: 2 steps x 8 completions (4 per process, 4 per question) = 4 of 8 questions."""
    question = {"question": "Which drug is first-line for type 2 diabetes?", "answer": "B",
                "options": {"A": "Insulin", "B": "Metformin", "C": "Warfarin", "D": "Aspirin"}}
    train = write_jsonl(tmp_path / "train.jsonl", [{**question, "question": f"{question['question']} ({i})"}
                                                   for i in range(8)])
    out = tmp_path / "out"
    result = launch([*TORCHRUN, "grpo_training.py", "--model_name_or_path", tiny_model_dir, "--train_files", train,
                     "--validation_split_percentage", "25", "--output_dir", out, "--max_steps", "2",
                     "--num_generations", "4", "--per_device_train_batch_size", "4", "--max_completion_length", "8",
                     "--eval_max_new_tokens", "6", "--save_strategy", "no", "--logging_steps", "1", "--report_to",
                     "none", "--gradient_checkpointing", "false", "--deepspeed", "zero2.json"])
    assert "DeepSpeed ZeRO stage 2" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epoch"] == pytest.approx(2 * 2 / metrics["train_questions"])  # both processes took questions
    assert "eval_accuracy_before" in metrics and "eval_accuracy" in metrics
    # (a tiny random model's completions usually all score 0: no advantage, so the weights may not move)
    chat = ChatModel.load(ModelArguments(model_name_or_path=str(tiny_model_dir), adapter_name_or_path=str(out)))
    assert isinstance(chat.generate([[{"role": "user", "content": "Fever?"}]], GenerationArguments(max_new_tokens=4))[0], str)


@pytest.mark.slow
def test_two_process_on_policy_distillation_with_zero2(tiny_model_dir, tmp_path):
    """OPD under torchrun with ZeRO-2: the student trains on both ranks beside the frozen teacher."""
    data = write_jsonl(tmp_path / "train.jsonl", sft_records(16))
    out = tmp_path / "out"
    result = launch([*TORCHRUN, "opd_training.py", "--model_name_or_path", tiny_model_dir,
                     "--teacher_model_name_or_path", tiny_model_dir, "--train_files", data,
                     "--validation_split_percentage", "0", "--output_dir", out, "--max_steps", "2", "--max_length", "128",
                     "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no",
                     "--report_to", "none", "--max_new_tokens", "8", "--lmbda", "0.5", "--use_peft", "true",
                     "--gradient_checkpointing", "false", "--deepspeed", "zero2.json"])
    assert "DeepSpeed ZeRO stage 2" in result.stderr
    check_trained_on_two_ranks(out, records=16)
    check_loads_and_generates(out, tiny_model_dir, lora=True)
