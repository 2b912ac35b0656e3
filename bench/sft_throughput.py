"""SFT throughput: MedGPT's SFT path against a plain padded HF Trainer, in one run.

    .venv/bin/python bench/sft_throughput.py                      # embedded model, shipped SFT data
    .venv/bin/python bench/sft_throughput.py --steps 4 --model /tmp/tiny

Both sides train the same model (LoRA, same settings) on the same conversations for the same number
of optimizer steps with the same rows per step:

- medgpt:   supervised_finetuning.py's path with its defaults for this machine: conversations
            packed into --max_length rows with block-diagonal attention, TRL's SFTTrainer (its
            chunked loss computes the output layer only on answer tokens), bf16 autocast where the
            CPU/GPU computes bf16 natively.
- baseline: transformers' Trainer, each row one conversation padded to the longest in its batch,
            full-vocabulary logits and loss, fp32.

Printed per side: real (non-padding) tokens per second, model FLOPs utilization against a matmul
peak measured in the same run in that side's precision, and peak memory (RSS on CPU, max allocated on GPU); then the ratios.
Each side runs in its own process so peak memory is its own.
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


def load_rows(args, tokenizer, template):
    from medgpt.data_files import find_data_files, raw_records
    from medgpt.tokenization import build_sft_dataset

    records = raw_records(find_data_files(args.data_dir, None, (".jsonl", ".json"), "train"))
    dataset, _ = build_sft_dataset(records, tokenizer, template, args.max_length, "skip")
    return dataset


def run_side(args) -> dict:
    """Train one side for --steps optimizer steps; return its measurements."""
    import torch
    from transformers import Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from medgpt.args import LoraArguments, ModelArguments, _hardware_defaults
    from medgpt.modeling import load_model, load_tokenizer
    from medgpt.packing import SFTCollator, block_mask_trainer, pack_sequences
    from medgpt.chat_template import get_template

    torch.manual_seed(0)
    model_args = ModelArguments(model_name_or_path=args.model)
    tokenizer = load_tokenizer(model_args)
    template = get_template(None, tokenizer)
    dataset = load_rows(args, tokenizer, template)
    model = load_model(model_args, LoraArguments())
    params = sum(p.numel() for p in model.parameters())
    common = dict(output_dir=args.workdir, max_steps=args.steps, per_device_train_batch_size=args.rows,
                  learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                  gradient_checkpointing=False, dataloader_pin_memory=False)
    # MedGPT's default precision for this machine (bf16 autocast where the CPU or GPU does bf16 natively)
    # against the baseline's plain fp32.
    precision = _hardware_defaults() if args.side == "medgpt" else {"bf16": False}
    common.update({k: v for k, v in precision.items() if k in ("bf16", "use_cpu")})
    collator = SFTCollator(tokenizer.pad_token_id, dtype=model.dtype)
    if args.side == "medgpt":
        dataset = pack_sequences(dataset, args.max_length, seed=0)
        config = SFTConfig(**common, max_length=args.max_length, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = block_mask_trainer(SFTTrainer)(model=model, args=config, train_dataset=dataset,
                                                 processing_class=tokenizer, data_collator=collator)
    else:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                          processing_class=tokenizer, data_collator=collator)

    real_tokens = 0
    original = collator.__call__

    def counting(features):  # count the non-padding tokens actually fed
        nonlocal real_tokens
        real_tokens += sum(len(f["input_ids"]) for f in features)
        return original(features)

    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = matmul_peak_flops("bfloat16" if common.get("bf16") else "float32")
    tokens_per_second = real_tokens / seconds
    # training FLOPs per token ~ 6 x parameters (forward + backward), the usual MFU convention
    return {"side": args.side, "bf16": bool(common.get("bf16")), "steps": args.steps, "real_tokens": real_tokens, "seconds": seconds,
            "tokens_per_second": tokens_per_second, "mfu": 6 * params * tokens_per_second / peak,
            "matmul_peak_gflops": peak / 1e9, "peak_memory_gib": peak_memory_bytes() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder (default: the embedded model).")
    parser.add_argument("--data_dir", default=str(ROOT / "data/sft/train"))
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2, help="Rows per step (packed rows vs padded conversations).")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--side", choices=["medgpt", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="/tmp/medgpt-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args)), flush=True)
        return
    results = {}
    for side in ("baseline", "medgpt"):
        command = [sys.executable, __file__, "--side", side, "--data_dir", args.data_dir, "--max_length",
                   str(args.max_length), "--rows", str(args.rows), "--steps", str(args.steps)]
        if args.model:
            command += ["--model", args.model]
        output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode != 0 or not lines:
            raise SystemExit(f"{side} failed:\n{output.stderr[-3000:]}")
        results[side] = json.loads(lines[-1][7:])
    print(f"{'':10} {'real tok/s':>11} {'MFU':>7} {'peak GiB':>9} {'tokens':>8} {'seconds':>8}  precision")
    for side, r in results.items():
        print(f"{side:10} {r['tokens_per_second']:11.1f} {r['mfu']:7.2%} {r['peak_memory_gib']:9.2f} "
              f"{r['real_tokens']:8d} {r['seconds']:8.1f}  {'bf16 autocast' if r['bf16'] else 'fp32'}")
    speed = results["medgpt"]["tokens_per_second"] / results["baseline"]["tokens_per_second"]
    memory = results["medgpt"]["peak_memory_gib"] / results["baseline"]["peak_memory_gib"]
    print(f"\nmedgpt / baseline: {speed:.2f}x real tokens/s, {memory:.2f}x peak memory (matmul peaks: "
          + ", ".join(f"{side} {r['matmul_peak_gflops']:.0f} GFLOP/s" for side, r in results.items()) + ")")
    print("target: >= 1.5x tokens/s at <= 1.0x memory:", "met" if speed >= 1.5 and memory <= 1.0 else "NOT met")


if __name__ == "__main__":
    main()
