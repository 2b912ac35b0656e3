"""Multi-process training on CPU: two processes under torchrun (gloo), plain DDP and DeepSpeed ZeRO;
the saved model (full or LoRA) loads and generates."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, sft_records, write_jsonl
from medgpt.args import ModelArguments
from medgpt.generation import ChatModel, GenerationArguments


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed, use_peft", [(None, "true"), ("zero2.json", "true"), ("zero3.json", "true"),
                                                 ("zero3.json", "false"), ("zero3_offload.json", "true")],
                         ids=["ddp-lora", "zero2-lora", "zero3-lora", "zero3-full", "zero3-offload-lora"])
def test_two_process_sft_saves_a_loadable_model(tiny_model_dir, tmp_path, deepspeed, use_peft):
    data = write_jsonl(tmp_path / "train.jsonl", sft_records(16))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "supervised_finetuning.py", "--model_name_or_path", str(tiny_model_dir), "--train_files", str(data),
               "--validation_split_percentage", "0", "--output_dir", str(out), "--max_steps", "2",
               "--max_length", "128", "--per_device_train_batch_size", "2", "--logging_steps", "1",
               "--save_strategy", "no", "--report_to", "none", "--use_peft", use_peft, "--learning_rate", "1e-2"]
    if deepspeed:
        command += ["--deepspeed", deepspeed]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    state = json.loads((out / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2]

    lora = (out / "adapter_config.json").is_file()
    assert lora == (use_peft == "true")
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), adapter_name_or_path=str(out)) if lora \
        else ModelArguments(model_name_or_path=str(out))
    chat = ChatModel.load(model_args)
    trained = chat.model.state_dict()
    base = ChatModel.load(ModelArguments(model_name_or_path=str(tiny_model_dir))).model.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base if "proj" in k), "training changed no weights"
    answer = chat.generate([[{"role": "user", "content": "What is a fever?"}]], GenerationArguments(max_new_tokens=4))
    assert isinstance(answer[0], str)
