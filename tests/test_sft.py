"""SFT end to end on a tiny model: train, resume, merge, answer; QLoRA; full; seeded numerics."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_main, run_script


def sft_args(model_dir, data_dir, output_dir, *extra):
    return [
        "--model_name_or_path", str(model_dir),
        "--train_file_dir", str(data_dir / "train"),
        "--validation_file_dir", str(data_dir / "eval"),
        "--output_dir", str(output_dir),
        "--max_length", "128",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2",
        "--learning_rate", "5e-3",
        "--logging_steps", "1",
        "--report_to", "none",
        "--gradient_checkpointing", "false",
        "--seed", "7",
        "--dataloader_num_workers", "0",
        *extra,
    ]


def run_sft(*args):
    import supervised_finetuning

    return supervised_finetuning.main(list(args))


@pytest.mark.slow
def test_lora_sft_then_merge_then_batch_inference(tiny_model_dir, sft_data_dir, tmp_path):
    out = tmp_path / "sft"
    run_script("supervised_finetuning.py", *sft_args(tiny_model_dir, sft_data_dir, out, "--max_steps", "2", "--packing", "true"))
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "medgpt_config.yaml",
                 "metrics.json", "loss.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["packing"] is True and metrics["train_records_kept"] == 16
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and "eval_loss" in metrics

    # LoRA B matrices start at zero: after training they must not be
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)

    merged = tmp_path / "merged"
    run_main("merge_peft_adapter.py", "--base_model", tiny_model_dir, "--lora_model", out, "--output_dir", merged)
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    base = load_file(tiny_model_dir / "model.safetensors")
    merged_weights = load_file(merged / "model.safetensors")
    changed = [k for k in base if "proj" in k and not torch.equal(base[k], merged_weights[k])]
    assert changed, "merging a trained adapter must change the projection weights"

    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "What is a fever?"}\n{"question": "头痛怎么办？", "answer": "reference"}\n', encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    run_main("inference.py", "--base_model", str(merged), "--data_file", str(questions), "--output_file", str(answers),
               "--max_new_tokens", "5", "--batch_size", "2", "--temperature", "0")
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    assert [r["question"] for r in rows] == ["What is a fever?", "头痛怎么办？"]
    assert all(isinstance(r["answer"], str) for r in rows) and rows[1]["reference"] == "reference"

    # base + adapter gives the same greedy answers as the merged model
    answers_lora = tmp_path / "answers_lora.jsonl"
    run_main("inference.py", "--base_model", str(tiny_model_dir), "--lora_model", str(out), "--data_file", str(questions),
               "--output_file", str(answers_lora), "--max_new_tokens", "5", "--temperature", "0")
    assert [json.loads(l)["answer"] for l in answers_lora.read_text().splitlines()] == [r["answer"] for r in rows]


@pytest.mark.slow
def test_full_finetuning_changes_weights(tiny_model_dir, sft_data_dir, tmp_path):
    out = tmp_path / "full"
    run_sft(*sft_args(tiny_model_dir, sft_data_dir, out, "--max_steps", "2", "--use_peft", "false"))
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_same_seed_same_loss_curve_and_resume(tiny_model_dir, sft_data_dir, tmp_path):
    def losses(directory):
        state = json.loads((directory / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    common = ("--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no", "--packing", "true")
    run_sft(*sft_args(tiny_model_dir, sft_data_dir, tmp_path / "a", *common))
    run_sft(*sft_args(tiny_model_dir, sft_data_dir, tmp_path / "b", *common))
    assert len(losses(tmp_path / "a")) == 4
    assert losses(tmp_path / "a") == losses(tmp_path / "b")

    # resume the second run from its step-2 checkpoint: steps 3-4 repeat the same losses
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert checkpoint.is_dir()
    run_sft(*sft_args(tiny_model_dir, sft_data_dir, tmp_path / "b", *common, "--resume_from_checkpoint", str(checkpoint)))
    resumed = losses(tmp_path / "b")
    assert resumed[-2:] == pytest.approx(losses(tmp_path / "a")[-2:], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["4", "8"])
def test_qlora_on_cpu(tiny_model_dir, sft_data_dir, tmp_path, bits):
    out = tmp_path / "qlora"
    metrics = run_sft(*sft_args(tiny_model_dir, sft_data_dir, out, "--max_steps", "1", f"--load_in_{bits}bit", "true",
                                "--eval_strategy", "no", "--max_eval_samples", "2"))
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert (out / "adapter_model.safetensors").is_file()


def test_quantized_full_training_is_refused(tiny_model_dir, sft_data_dir, tmp_path):
    with pytest.raises(ValueError, match="--use_peft true"):
        run_sft(*sft_args(tiny_model_dir, sft_data_dir, tmp_path / "x", "--max_steps", "1", "--load_in_4bit", "true",
                          "--use_peft", "false"))


def test_bad_data_stops_before_training(tiny_model_dir, sft_data_dir, tmp_path):
    bad = sft_data_dir / "train" / "bad.jsonl"
    bad.write_text('{"question": "q"}\n{"messages": [{"role": "user", "content": "q"}]}\n')
    from medgpt.records import DataError

    with pytest.raises(DataError) as error:
        run_sft(*sft_args(tiny_model_dir, sft_data_dir, tmp_path / "x", "--max_steps", "1"))
    assert f"{bad}:1:" in str(error.value) and f"{bad}:2:" in str(error.value)
    assert not (tmp_path / "x" / "adapter_model.safetensors").exists()


def test_interactive_chat_streams_clears_and_exits(tiny_model_dir):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run(
        [sys.executable, "inference.py", "--base_model", str(tiny_model_dir), "--interactive",
         "--max_new_tokens", "4", "--temperature", "0"],
        input="What is a fever?\nAnd a cough?\nclear\nexit\nnever asked\n", cwd=ROOT, capture_output=True,
        text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "not medical advice" in out
    assert out.count("Assistant: ") == 2  # two questions answered, nothing after exit
    assert "(conversation cleared)" in out


def test_trl_data_flags_that_medgpt_replaces_are_refused(tiny_model_dir, sft_data_dir, tmp_path):
    with pytest.raises(SystemExit, match="--packing true"):
        run_sft(*sft_args(tiny_model_dir, sft_data_dir, tmp_path / "x", "--max_steps", "1", "--padding_free", "true"))


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_auto_continues_the_same_curve(tiny_model_dir, sft_data_dir, tmp_path):
    """A run killed with SIGKILL loses only the steps since its last checkpoint; `--resume_from_checkpoint
    auto` continues from there with the losses an uninterrupted run has."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    def losses(directory):
        state = json.loads((directory / "trainer_state.json").read_text())
        return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}

    common = ("--max_steps", "8", "--save_steps", "2", "--eval_strategy", "no", "--packing", "true",
              "--learning_rate", "1e-3")
    run_sft(*sft_args(tiny_model_dir, sft_data_dir, tmp_path / "whole", *common))

    killed = tmp_path / "killed"
    # slow each step down so the kill lands mid-run, after the first checkpoint
    process = subprocess.Popen(
        [sys.executable, "-c", "import time, transformers.trainer as t; orig = t.Trainer.training_step\n"
         "def slow(self, *a, **k):\n    time.sleep(1.0)\n    return orig(self, *a, **k)\n"
         "t.Trainer.training_step = slow\nimport supervised_finetuning, sys\nsupervised_finetuning.main(sys.argv[1:])",
         *sft_args(tiny_model_dir, sft_data_dir, killed, *common)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint-4" / "trainer_state.json").is_file():
        assert time.time() < deadline and process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()  # an interrupted run does not look complete
    assert not (killed / "checkpoint-8").exists()
    for state_file in killed.glob("checkpoint-*/trainer_state.json"):  # visible later only if training resumed
        state = json.loads(state_file.read_text())
        state["log_history"][0]["loss"] = -1.0
        state_file.write_text(json.dumps(state))

    run_sft(*sft_args(tiny_model_dir, sft_data_dir, killed, *common, "--resume_from_checkpoint", "auto"))
    assert (killed / "metrics.json").is_file()
    whole, resumed = losses(tmp_path / "whole"), losses(killed)
    assert sorted(resumed) == list(range(1, 9))
    assert resumed[1] == -1.0, "the resumed run trained from step 1 again"
    for step in range(5, 9):  # the steps trained after the resume
        assert resumed[step] == pytest.approx(whole[step], rel=1e-4), step


def test_named_template_turn_end_token_is_saved_for_generate_merge_and_vllm(tiny_model_dir, sft_data_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    import merge_peft_adapter

    # a "base" model whose EOS is <|endoftext|>, trained with ChatML, whose turns end with <|im_end|>
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(base)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(base)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.eos_token_id

    out = tmp_path / "sft"
    run_sft(*sft_args(base, sft_data_dir, out, "--max_steps", "1", "--template_name", "chatml", "--eval_strategy", "no"))
    assert GenerationConfig.from_pretrained(out).eos_token_id == [tokenizer.eos_token_id, im_end]
    merged = merge_peft_adapter.main(["--base_model", str(base), "--lora_model", str(out),
                                      "--output_dir", str(tmp_path / "merged")])
    assert GenerationConfig.from_pretrained(merged).eos_token_id == [tokenizer.eos_token_id, im_end]

    full = tmp_path / "full"
    run_sft(*sft_args(base, sft_data_dir, full, "--max_steps", "1", "--template_name", "chatml", "--eval_strategy", "no",
                      "--use_peft", "false"))
    assert GenerationConfig.from_pretrained(full).eos_token_id == [tokenizer.eos_token_id, im_end]


def test_packing_is_the_stage_default(tmp_path):
    import supervised_finetuning

    def packing(*flags):
        return supervised_finetuning.parse(["--output_dir", str(tmp_path), *flags])[3].packing

    assert packing() is True
    assert packing("--packing", "false") is False
    assert packing("--streaming", "true") is False  # the default gives way to streaming; an explicit one is refused
    config = tmp_path / "sft.yaml"
    config.write_text("packing: false\n")
    assert packing("--config", str(config)) is False


def test_lora_with_bf16_loads_frozen_weights_in_bf16_and_keeps_the_adapter_fp32(tiny_model_dir):
    from medgpt.args import LoraArguments, ModelArguments
    from medgpt.modeling import load_model

    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    model = load_model(model_args, LoraArguments(), mixed_precision=True)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    # full training keeps fp32 weights (they are the master weights the optimizer updates)
    full = load_model(model_args, LoraArguments(use_peft=False), mixed_precision=True)
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in load_model(model_args, LoraArguments()).parameters()} == {torch.float32}


def test_packed_sft_on_cpu_attends_per_sequence_and_trains_as_block_masks_do(tiny_model_dir, sft_data_dir, tmp_path):
    """The CPU default for packed rows (flattened batch, attention sequence by sequence) trains exactly as the
    block-diagonal masks over padded rows (--attn_implementation sdpa), in fp32. Plain SGD: Adam's first steps
    move every weight by +-lr whatever its gradient's size, so rounding noise in near-zero gradients would show."""
    common = ["--max_steps", "3", "--bf16", "false", "--optim", "sgd", "--learning_rate", "1.0", "--eval_strategy", "no",
              "--lora_dropout", "0"]  # dropout masks depend on the batch's shape (flat vs padded rows)
    flat = run_sft(*sft_args(tiny_model_dir, sft_data_dir, tmp_path / "flat", *common))
    masked = run_sft(*sft_args(tiny_model_dir, sft_data_dir, tmp_path / "masked", *common,
                               "--attn_implementation", "sdpa"))
    assert flat["attention"] == "medgpt_packed_sdpa" and masked["attention"] == "sdpa"
    assert flat["packing"] and masked["packing"]
    for key in ("train_loss", "eval_loss"):
        assert flat[key] == pytest.approx(masked[key], rel=1e-6), key
