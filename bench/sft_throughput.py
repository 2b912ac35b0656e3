"""SFT throughput: supervised_finetuning.py with its defaults against the reference way of LoRA SFT, in one run.

    .venv/bin/python bench/sft_throughput.py                      # embedded model, shipped SFT data
    .venv/bin/python bench/sft_throughput.py --precision fp32     # both sides fp32 (weights and compute)
    .venv/bin/python bench/sft_throughput.py --steps 2 --model /tmp/tiny

Both sides train the same model with the same LoRA (r 8, alpha 16, every linear layer, the
stage's dropout 0.05) on the same
tokenized conversations (data/sft/train, each at most --max_length tokens) for the same number of
optimizer steps with the same rows per step:

- medgpt:   supervised_finetuning.py's own trainer (``build_trainer``) with the stage's defaults for
            this machine, as ``parse`` resolves them with no config file (only model, data, rows, length,
            steps and LoRA size given): e.g. packing and, where the CPU/GPU computes bf16 natively, bf16.
- baseline: the reference toolkit's documented settings: weights loaded with dtype=bfloat16 and
            ``bf16=True``, a plain transformers Trainer, one conversation per row padded to the longest in
            its batch (truncated to --max_length), full-vocabulary logits and loss.

``--precision fp32`` instead runs both sides in fp32 (weights and compute: baseline fp32 weights without
bf16, medgpt with ``--bf16 false``), an fp32-vs-fp32 comparison.

The medgpt side keeps every other default of the script, gradient checkpointing included (TRL's SFTConfig
turns it on); the baseline runs without it, as the issue measured the reference (its run_sft.sh passes
``--gradient_checkpointing True``, which would cost it speed and save it memory).

Printed per side: real (non-padding) tokens per second over the steps after --warmup_steps (both sides
alike; the whole run's figure next to it), model FLOPs utilization against a matmul peak
measured in the same run in that side's precision, and peak memory (RSS on CPU, max allocated on GPU);
then the ratios. Each side runs in its own process so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medgpt.allocator import allocator_name, launch_env  # noqa: E402

SPEED_TARGET, MEMORY_TARGET = 1.5, 0.35  # issue 17: medgpt / baseline


def matmul_peak_flops(dtype_name: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Achievable matmul FLOP/s on this device in the given dtype, measured now."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def stage_flags(args) -> list[str]:
    """What the comparison fixes for supervised_finetuning.py; everything else is the stage's default."""
    flags = ["--train_file_dir", args.data_dir, "--output_dir", args.workdir, "--max_length", str(args.max_length),
             "--per_device_train_batch_size", str(args.rows), "--gradient_accumulation_steps", "1",
             "--max_steps", str(args.steps), "--lora_r", "8", "--lora_alpha", "16",
             "--lora_target_modules", "all-linear", "--learning_rate", "1e-4", "--logging_steps", "1",
             "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--seed", "0",
             "--dataloader_num_workers", "0"]
    if args.model:
        flags += ["--model_name_or_path", args.model]
    if args.precision == "fp32":
        flags += ["--bf16", "false", "--torch_dtype", "float32"]
    return flags + args.medgpt_flags.split()


def load_rows(data_dir, max_length, tokenizer, template):
    """The shipped conversations tokenized once, each cut to at most max_length tokens (both sides use these)."""
    from medgpt.data_files import find_data_files, raw_records
    from medgpt.tokenization import build_sft_dataset

    records = raw_records(find_data_files(data_dir, None, (".jsonl", ".json"), "train"))
    dataset, _ = build_sft_dataset(records, tokenizer, template, max_length, "truncate")
    return dataset.select_columns(["input_ids", "labels"])


def run_side(args) -> dict:
    """Train one side for --steps optimizer steps; return its measurements."""
    import torch

    import supervised_finetuning
    from medgpt.modeling import load_template, load_tokenizer

    model_args, _, lora_args, training_args, _ = supervised_finetuning.parse(stage_flags(args))
    tokenizer = load_tokenizer(model_args)
    template = load_template(model_args, tokenizer)
    dataset = load_rows(args.data_dir, args.max_length, tokenizer, template)
    torch.manual_seed(0)
    if args.side == "medgpt":
        packing = training_args.packing
        if packing:
            from medgpt.packing import pack_sequences

            dataset = pack_sequences(dataset, args.max_length, seed=training_args.seed)
        trainer = supervised_finetuning.build_trainer(model_args, lora_args, training_args, tokenizer, dataset)
        bf16 = training_args.bf16
        description = ("packed" if packing else "padded") + (", bf16" if bf16 else ", fp32")
    else:
        trainer, bf16 = reference_trainer(args, model_args, lora_args, training_args, tokenizer, dataset)
        description = "padded, " + ("bf16 weights + bf16" if bf16 else "fp32")
    model = trainer.model
    params = sum(p.numel() for p in model.parameters())
    weights_dtype = str(next(p for p in model.parameters() if not p.requires_grad).dtype).removeprefix("torch.")

    from transformers import TrainerCallback

    tokens, times = [], []  # per optimizer step (one batch per step): non-padding tokens fed, seconds
    original = trainer.data_collator

    def counting(features):  # count the non-padding tokens actually fed
        tokens.append(sum(len(f["input_ids"]) for f in features))
        return original(features)

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    trainer.data_collator = counting
    trainer.add_callback(StepTimes())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = matmul_peak_flops("bfloat16" if bf16 else "float32")
    warm = min(args.warmup_steps, len(times) - 1)
    tokens_per_second = sum(tokens[warm:len(times)]) / sum(times[warm:])
    # training FLOPs per token ~ 6 x parameters (forward + backward), the usual MFU convention
    return {"side": args.side, "allocator": allocator_name(), "bf16": bool(bf16), "description": description, "weights": weights_dtype,
            "steps": args.steps, "real_tokens": sum(tokens[:len(times)]), "seconds": seconds,
            "warmup_steps": warm, "step_seconds": [round(t, 2) for t in times],
            "tokens_per_second": tokens_per_second, "tokens_per_second_with_warmup": sum(tokens[:len(times)]) / seconds,
            "mfu": 6 * params * tokens_per_second / peak,
            "matmul_peak_gflops": peak / 1e9, "peak_memory_gib": peak_memory_bytes() / 2**30}


def reference_trainer(args, model_args, lora_args, training_args, tokenizer, dataset):
    """The reference toolkit's documented LoRA SFT: bf16 weights and bf16=True (fp32 with --precision fp32),
    transformers' Trainer, one conversation per row padded to the longest in the batch, full-vocabulary logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from medgpt.modeling import resolve_model_path

    bf16 = args.precision == "bf16"
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_args),
                                                 dtype=torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                             lora_dropout=lora_args.lora_dropout,
                                             target_modules="all-linear"))
    settings = TrainingArguments(
        output_dir=args.workdir, max_steps=args.steps, per_device_train_batch_size=args.rows, learning_rate=1e-4,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, gradient_checkpointing=False,
        dataloader_pin_memory=False, dataloader_num_workers=0, bf16=bf16, use_cpu=training_args.use_cpu)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    return Trainer(model=model, args=settings, train_dataset=dataset, processing_class=tokenizer,
                   data_collator=collator), bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder (default: the embedded model).")
    parser.add_argument("--data_dir", default=str(ROOT / "data/sft/train"))
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--rows", type=int, default=4, help="Rows per step (packed rows vs padded conversations).")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup_steps", type=int, default=2,
                        help="Steps left out of tokens/s on both sides (the first steps on CPU run several times "
                        "slower while the allocator and oneDNN warm up); the whole run's figure is printed too.")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: the reference's bf16 settings against MedGPT's defaults; fp32: both sides fp32.")
    parser.add_argument("--medgpt_flags", default="", help="Extra supervised_finetuning.py flags for the medgpt side "
                        "(ablations), e.g. '--packing false' or '--torch_dtype float32'.")
    parser.add_argument("--sides", default="baseline,medgpt", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["medgpt", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="/tmp/medgpt-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args)), flush=True)
        return
    results = {}
    for side in args.sides.split(","):
        command = [sys.executable, __file__, "--side", side, "--data_dir", args.data_dir, "--max_length",
                   str(args.max_length), "--rows", str(args.rows), "--steps", str(args.steps),
                   "--warmup_steps", str(args.warmup_steps),
                   "--precision", args.precision, "--workdir", args.workdir,
                   f"--medgpt_flags={args.medgpt_flags}", "--sides", args.sides]
        if args.model:
            command += ["--model", args.model]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env = launch_env(env) if side == "medgpt" else env  # MedGPT's launchers preload tcmalloc where installed
        output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode != 0 or not lines:
            raise SystemExit(f"{side} failed:\n{output.stderr[-3000:]}")
        results[side] = json.loads(lines[-1][7:])
    print(f"{'':10} {'real tok/s':>11} {'(all steps)':>11} {'MFU':>7} {'peak GiB':>9} {'tokens':>8} {'seconds':>8}  "
          "weights, how, allocator")
    for side, r in results.items():
        print(f"{side:10} {r['tokens_per_second']:11.1f} {r['tokens_per_second_with_warmup']:11.1f} {r['mfu']:7.2%} "
              f"{r['peak_memory_gib']:9.2f} {r['real_tokens']:8d} {r['seconds']:8.1f}  {r['weights']}, {r['description']}, "
              f"{r['allocator']}")
        print(f"{'':10} step seconds: {r['step_seconds']} (first {r['warmup_steps']} left out of tokens/s)")
    if set(results) != {"baseline", "medgpt"}:
        return
    speed = results["medgpt"]["tokens_per_second"] / results["baseline"]["tokens_per_second"]
    memory = results["medgpt"]["peak_memory_gib"] / results["baseline"]["peak_memory_gib"]
    print(f"\nmedgpt / baseline: {speed:.2f}x real tokens/s, {memory:.2f}x peak memory (matmul peaks: "
          + ", ".join(f"{side} {r['matmul_peak_gflops']:.0f} GFLOP/s" for side, r in results.items()) + ")")
    if args.precision != "bf16":  # the target compares MedGPT's defaults with the reference's bf16 settings
        print("(fp32 on both sides: a comparison, not the target's setting; the target is checked with --precision bf16)")
        return
    print(f"target: >= {SPEED_TARGET}x tokens/s at <= {MEMORY_TARGET}x memory:",
          "met" if speed >= SPEED_TARGET and memory <= MEMORY_TARGET else "NOT met")


if __name__ == "__main__":
    main()
