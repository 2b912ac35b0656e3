"""DPO LoRA memory: MedGPT's DPO stage against a plain TRL DPOTrainer run with a separate reference model.

    .venv/bin/python bench/dpo_memory.py                       # embedded model, data/preference/train
    .venv/bin/python bench/dpo_memory.py --steps 4 --order medgpt,baseline

Both sides train the same model with the same LoRA settings (r 8, alpha 16, dropout 0.05, all linear
layers) on the same preference pairs (the first --steps x --batch_size of the files, one epoch), with the
same batch size, max length, learning rate, seed, number of optimizer steps and precision (MedGPT's default
for the machine: bf16 autocast over fp32 weights where the CPU or GPU computes bf16 natively, else fp32;
given to both sides). Everything else is each side's own default (gradient checkpointing is on in both:
TRL's DPOConfig default, which dpo_training.py keeps when no config file says otherwise).

- baseline: TRL used plainly, as its documentation shows: the pairs as prompt/chosen/rejected
            messages (TRL applies the tokenizer's chat template and tokenizes them),
            ``DPOTrainer(model=policy, ref_model=<a second full copy of the model>, peft_config=LoraConfig(...))``.
            TRL 1.12 wraps the policy with the LoRA config and, because a ref_model is given, keeps it
            and runs the reference forward on it (trl/trainer/dpo_trainer.py: ``self.ref_model = ref_model``;
            the adapter-disabled path is taken only when ``self.ref_model is None``).
- medgpt:   dpo_training.py as the stage runs it (``dpo_training.main([...])``) with its defaults: LoRA,
            the reference = the same model with the adapter disabled (no second model), MedGPT's own
            tokenization of the pairs with the stage's template.

Printed per side: pairs/s over the training loop (the Trainer's train_runtime, plus the pass that
precomputes the reference log-probabilities before training where a side does that), its seconds, the
non-padding tokens fed, the resident memory after imports and when training starts, and the peak
resident memory of the whole process (VmHWM: loading, data preparation, training and saving).
Each side runs in its own process so its peak is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medgpt.allocator import allocator_name, launch_env  # noqa: E402

LORA = dict(r=8, alpha=16, dropout=0.05, targets="all-linear")


def memory_gib(field: str) -> float:
    """A field of /proc/self/status (VmRSS: resident now, VmHWM: resident peak) in GiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def watch_train_start(marks: dict) -> None:
    """Record resident memory when Trainer.train starts (models loaded, data prepared, trainer built), and the
    time of any pass that precomputes the reference log-probabilities before training (it counts as training)."""
    import time

    from transformers import Trainer
    from trl import DPOTrainer

    precompute = DPOTrainer._precompute_ref_logps
    marks["reference_pass_seconds"] = 0.0

    def timed_precompute(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return precompute(self, *args, **kwargs)
        finally:
            marks["reference_pass_seconds"] += time.perf_counter() - started

    DPOTrainer._precompute_ref_logps = timed_precompute
    original = Trainer.train

    def train(self, *args, **kwargs):
        marks["rss_train_start_gib"] = memory_gib("VmRSS")
        marks["hwm_train_start_gib"] = memory_gib("VmHWM")
        self.args.include_num_input_tokens_seen = "non_padding"  # the same count on both sides
        return original(self, *args, **kwargs)

    Trainer.train = train


def preference_pairs(data_dir: str):
    """The shipped pairs in TRL's conversational preference format, read plainly from the files (ShareGPT
    conversations + chosen/rejected, and system/history/question + response_chosen/response_rejected)."""
    from datasets import Dataset

    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for path in sorted(Path(data_dir).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if "conversations" in record:
                prompt = [{"role": roles[m["from"]], "content": m["value"]} for m in record["conversations"]]
                chosen, rejected = record["chosen"], record["rejected"]
            else:
                prompt = [{"role": "system", "content": record["system"]}] if record.get("system") else []
                for question, answer in record.get("history") or []:
                    prompt += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                prompt.append({"role": "user", "content": record["question"]})
                chosen, rejected = record["response_chosen"], record["response_rejected"]
            rows["prompt"].append(prompt)
            rows["chosen"].append([{"role": "assistant", "content": chosen}])
            rows["rejected"].append([{"role": "assistant", "content": rejected}])
    return Dataset.from_dict(rows)


def training_options(args, precision: dict) -> dict:
    return dict(max_steps=args.steps, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
                learning_rate=5e-5, beta=0.1, loss_type="sigmoid", logging_steps=1, save_strategy="no",
                report_to="none", seed=0, dataloader_pin_memory=False, **precision)


def run_baseline(args, precision: dict, marks: dict) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = preference_pairs(args.data_dir)
    dataset = dataset.select(range(min(len(dataset), args.steps * args.batch_size)))  # the pairs trained on
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # the separate reference
    config = DPOConfig(output_dir=args.workdir, **training_options(args, precision))
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["targets"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora)
    assert trainer.ref_model is reference, "TRL dropped the explicit reference model"
    marks["reference"] = "separate model"
    return trainer.train().metrics


def run_medgpt(args, precision: dict, marks: dict) -> dict:
    import dpo_training

    argv = ["--model_name_or_path", args.model, "--train_file_dir", args.data_dir, "--validation_split_percentage", "0",
            "--max_train_samples", str(args.steps * args.batch_size),  # the same first pairs as the baseline
            "--output_dir", args.workdir, "--use_peft", "true", "--lora_r", str(LORA["r"]),
            "--lora_alpha", str(LORA["alpha"]), "--lora_dropout", str(LORA["dropout"]),
            "--lora_target_modules", LORA["targets"]]
    for name, value in training_options(args, precision).items():
        argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    argv += args.medgpt_args
    marks["reference"] = "adapter disabled"
    return dpo_training.main(argv)


def run_side(args) -> dict:
    """Train one side for --steps optimizer steps in this process; return its measurements."""
    marks = {"rss_after_imports_gib": 0.0}
    import torch  # noqa: F401  (the imports both sides pay, measured before any model)
    import trl  # noqa: F401

    from medgpt.args import _hardware_defaults

    marks["rss_after_imports_gib"] = memory_gib("VmRSS")
    watch_train_start(marks)
    hardware = _hardware_defaults()
    precision = {"bf16": bool(hardware.get("bf16")), "use_cpu": bool(hardware.get("use_cpu"))}
    metrics = (run_medgpt if args.side == "medgpt" else run_baseline)(args, precision, marks)
    pairs = args.steps * args.batch_size
    seconds = metrics["train_runtime"] + marks["reference_pass_seconds"]
    return {"side": args.side, **marks, "bf16": precision["bf16"], "allocator": allocator_name(), "pairs": pairs, "seconds": seconds,
            "pairs_per_second": pairs / seconds, "tokens": int(metrics.get("num_input_tokens_seen", 0)),
            "train_loss": metrics.get("train_loss"), "peak_rss_gib": memory_gib("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder (default: the embedded model).")
    parser.add_argument("--data_dir", default=str(ROOT / "data/preference/train"))
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=2, help="Pairs per optimizer step.")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--order", default="baseline,medgpt", help="Which side runs first (sides run one after the other).")
    parser.add_argument("--medgpt_args", nargs=argparse.REMAINDER, default=[],
                        help="Extra flags for dpo_training.py (last on the command line).")
    parser.add_argument("--side", choices=["medgpt", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from medgpt.base_model import prepare_default_model

        args.model = str(prepare_default_model())
    if args.side:
        print("RESULT " + json.dumps(run_side(args)), flush=True)
        return
    results = {}
    for side in args.order.split(","):
        with tempfile.TemporaryDirectory(prefix=f"medgpt-bench-dpo-{side}-") as workdir:
            command = [sys.executable, __file__, "--side", side, "--model", args.model, "--data_dir", args.data_dir,
                       "--max_length", str(args.max_length), "--batch_size", str(args.batch_size),
                       "--steps", str(args.steps), "--workdir", workdir]
            if args.medgpt_args:
                command += ["--medgpt_args", *args.medgpt_args]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
            env = launch_env(env) if side == "medgpt" else env  # MedGPT's launchers preload tcmalloc where installed
            output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode != 0 or not lines:
            raise SystemExit(f"{side} failed:\n{output.stderr[-3000:]}")
        results[side] = json.loads(lines[-1][7:])
    print(f"{'':9} {'pairs/s':>8} {'seconds':>8} {'pairs':>6} {'tokens':>7} {'RSS imports':>12} "
          f"{'RSS train start':>16} {'peak RSS':>9}  reference, precision, allocator")
    for side, r in results.items():
        print(f"{side:9} {r['pairs_per_second']:8.3f} {r['seconds']:8.1f} {r['pairs']:6d} {r['tokens']:7d} "
              f"{r['rss_after_imports_gib']:8.2f} GiB {r['rss_train_start_gib']:12.2f} GiB {r['peak_rss_gib']:5.2f} GiB"
              f"  {r['reference']}, {'bf16 autocast' if r['bf16'] else 'fp32'}, {r['allocator']}")
    if len(results) < 2:
        return  # one side only (--order medgpt): no ratio
    speed = results["medgpt"]["pairs_per_second"] / results["baseline"]["pairs_per_second"]
    memory = results["medgpt"]["peak_rss_gib"] / results["baseline"]["peak_rss_gib"]
    print(f"\nmedgpt / baseline: {memory:.2f}x peak RSS, {speed:.2f}x pairs/s (order: {args.order})")
    print("target: <= 0.5x peak RSS at >= 1.0x pairs/s:", "met" if memory <= 0.5 and speed >= 1.0 else "NOT met")


if __name__ == "__main__":
    main()
