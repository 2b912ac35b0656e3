"""CPU training speed-ups keep the math: bulk-drawn dropout masks, bf16 adapter inputs during steps; freed memory
is reused instead of faulted in again."""

import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from medgpt.cpu_training import BulkDropout, use_bulk_dropout


def test_bulk_dropout_drops_p_of_the_elements_and_scales_the_rest():
    torch.manual_seed(0)
    x = torch.ones(3_000_001)  # not a multiple of four: the last draw is partly used
    dropout = BulkDropout(0.05).train()
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.0006  # ~5 standard deviations of a Bernoulli(0.05) mean over 3M elements
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / 0.95))
    assert not torch.equal(dropout(x), y)  # a fresh mask each call
    assert torch.equal(dropout.eval()(x), x) and torch.equal(BulkDropout(0.0).train()(x), x)
    for p in (0.1, 0.5):  # every lane of the 64-bit draws is uniform: other rates come out right too
        assert abs((BulkDropout(p).train()(x) == 0).float().mean().item() - p) < 0.002
    for lane in range(4):  # each of the four 16-bit lanes of a draw drops at the rate, the top one included
        assert abs((y[lane::4] == 0).float().mean().item() - 0.05) < 0.0012
    # the gradient passes the kept elements scaled, and nothing of the dropped ones
    x = torch.ones(1001, dtype=torch.bfloat16, requires_grad=True)
    y = dropout(x)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


def test_trl_disable_dropout_switches_bulk_dropout_off():
    """DPO, GRPO, KTO and distillation switch dropout off by default (TRL's disable_dropout sets p = 0 on every
    nn.Dropout): the bulk masks must go off with it, or those stages train with dropout TRL meant to disable."""
    from trl.trainer.utils import disable_dropout_in_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), BulkDropout(0.5)).train()
    x = torch.ones(64, 8)
    assert (model(x) == 0).any()  # on: half the outputs dropped
    disable_dropout_in_model(model)
    assert torch.equal(model(x), model[0](x))  # off, still in training mode


def test_bulk_dropout_masks_replay_under_gradient_checkpointing():
    """Checkpointing recomputes the forward in backward: the mask must be the same draw (torch's RNG state)."""
    from torch.utils.checkpoint import checkpoint

    weight = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    dropout = BulkDropout(0.3).train()

    def layer(inputs):
        return (dropout(inputs) @ weight).tanh()

    torch.manual_seed(1)
    layer(x).sum().backward()
    plain = weight.grad.clone()
    weight.grad = None
    torch.manual_seed(1)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert torch.equal(weight.grad, plain)


def test_lora_on_cpu_uses_bulk_dropout_and_bf16_inputs_give_the_same_step(tiny_model_dir, tmp_path):
    from peft.helpers import disable_input_dtype_casting

    from medgpt.args import LoraArguments, ModelArguments
    from medgpt.modeling import adapter_inputs_in_bf16, load_model

    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    model = load_model(model_args, LoraArguments(lora_dropout=0.05), mixed_precision=True)
    assert sum(isinstance(m, BulkDropout) for m in model.modules()) > 0
    assert use_bulk_dropout(model) == 0  # nothing left to replace
    # with dropout off, adapters fed bf16 inputs compute exactly what PEFT's fp32 cast + autocast computes
    model = load_model(model_args, LoraArguments(lora_dropout=0.0), mixed_precision=True)
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02)  # LoRA B starts at zero: make the adapter matter
    ids = torch.randint(0, 100, (2, 24))

    def loss_and_grads(cast: bool):
        model.zero_grad()
        with disable_input_dtype_casting(model, active=not cast), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    (loss_cast, grads_cast), (loss_bf16, grads_bf16) = loss_and_grads(True), loss_and_grads(False)
    assert loss_cast == loss_bf16 and all(torch.equal(a, b) for a, b in zip(grads_cast, grads_bf16))

    from transformers import Trainer, TrainingArguments

    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True,
                                                          report_to=[]))
    callback = adapter_inputs_in_bf16(trainer)
    assert callback in trainer.callback_handler.callbacks
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    callback.on_step_begin(None, None, None)
    assert not any(layer.cast_input_dtype_enabled for layer in layers)
    callback.on_step_end(None, None, None)  # evaluation and generation outside the steps cast as PEFT does
    assert all(layer.cast_input_dtype_enabled for layer in layers)
    fp32 = load_model(model_args, LoraArguments(), mixed_precision=False)
    fp32_trainer = Trainer(model=fp32, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    count = len(fp32_trainer.callback_handler.callbacks)
    assert adapter_inputs_in_bf16(fp32_trainer) is None and len(fp32_trainer.callback_handler.callbacks) == count


FAULTS = """
import resource, sys, torch
from medgpt.cpu_training import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))
                               for _ in range(4)])
x = torch.randn(2048, 512)
def step():  # a training step: activations and gradients of 4-16 MiB, freed when it ends
    layers.zero_grad(set_to_none=True)
    layers(x).square().mean().backward()
step(); step()  # the first steps set the process up (thread pools, the heap's size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """Training steps (forward and backward of an MLP) fault far fewer new pages in with keep_freed_memory than
    with glibc's defaults, which hand the step's memory back and fault it in again at every step (measured:
    70-140 thousand faults in 10 steps vs 8-15 thousand)."""
    def page_faults(mode: str) -> int:
        output = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        return int(output.stdout.split()[-1])

    plain, kept = page_faults("plain"), page_faults("keep")
    assert plain > 20000 and kept * 3 < plain, (plain, kept)


def test_checkpointed_blocks_leaves_the_others_unrecomputed_spread_over_the_depth(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from medgpt.modeling import checkpoint_some_blocks

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                         num_attention_heads=2, num_key_value_heads=2))

    def flags(share, checkpointing=True):
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                                              gradient_checkpointing=checkpointing))
        model.gradient_checkpointing_enable()  # what the trainer does when training starts
        callback = checkpoint_some_blocks(trainer, share)
        if callback is not None:
            callback.on_train_begin(trainer.args, trainer.state, trainer.control)
        return [layer.gradient_checkpointing for layer in model.model.layers]

    assert flags(2 / 3) == [False, True, True, False, True, True]
    assert flags(0.5) == [False, True, False, True, False, True]
    assert flags(1.0) == [True] * 6
    assert flags(None) == ([True] * 6 if torch.cuda.is_available() else [False, True, True, True, True, True])
    assert flags(0.5, checkpointing=False) == [True] * 6  # nothing added without gradient checkpointing


@pytest.mark.slow
def test_checkpointing_part_of_the_blocks_trains_exactly_as_checkpointing_all(tiny_model_dir, tmp_path):
    import supervised_finetuning
    from conftest import sft_records, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", sft_records(8))
    common = ["--model_name_or_path", str(tiny_model_dir), "--train_files", str(data), "--max_steps", "2",
              "--max_length", "128", "--learning_rate", "1e-2", "--validation_split_percentage", "25",
              "--gradient_checkpointing", "true", "--lora_dropout", "0.1", "--report_to", "none", "--seed", "3",
              "--per_device_train_batch_size", "2", "--save_strategy", "no", "--logging_steps", "1"]
    part = supervised_finetuning.main([*common, "--checkpointed_blocks", "0.5", "--output_dir", str(tmp_path / "a")])
    every = supervised_finetuning.main([*common, "--checkpointed_blocks", "1", "--output_dir", str(tmp_path / "b")])
    assert part["train_loss"] == pytest.approx(every["train_loss"], rel=1e-6)
    assert part["eval_loss"] == pytest.approx(every["eval_loss"], rel=1e-6)
