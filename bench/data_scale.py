"""Data preparation at scale: MedGPT's PT and SFT data paths against a plain `datasets.map` baseline.

    python bench/data_scale.py                       # 100 MB and 1 GB corpora, 1M conversations (about 40 min)
    python bench/data_scale.py --sizes_mb 20 --sft_records 20000   # a quick look

For each generated corpus it prints, in one run, the seconds and peak RSS of:
- baseline: the reference toolkit's recipe (`load_dataset("text")`, `map(tokenize, batched, num_proc)`,
  `map(group_texts, batched, num_proc)`), the way the field prepares continued-pretraining data;
- medgpt: `prepare_pretraining_data` (raw rows in Arrow, tokenize, hash-dedup, blocks, saved to the cache);
- medgpt again: the same call with the cache warm (what a second run waits before training starts);
and the same for SFT on generated conversations. Each measurement is its own process, so its peak RSS
(VmHWM of the main process; the largest `num_proc` worker apart) is its own. The corpora are written once
into --workdir and reused. Nothing here is a test: figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = ["hypertension", "type 2 diabetes", "asthma", "community-acquired pneumonia", "atrial fibrillation",
          "chronic kidney disease", "heart failure", "migraine", "iron-deficiency anaemia", "hypothyroidism"]
FACTS = ["is diagnosed from repeated measurements and the patient's history", "needs regular follow-up",
         "is managed with lifestyle change first and medicines when needed", "can be worsened by smoking",
         "should be reviewed when kidney function changes", "has warning signs that need emergency care",
         "is treated according to national guidelines", "is common in older adults"]


def peak_rss_gib() -> tuple[float, float]:
    """(this process's peak RSS, the largest finished child's peak RSS), in GiB."""
    main = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:")) / 2**20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return main, children


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> Path:
    """A text corpus of about ``megabytes`` MB, one unique document per line (numbers make each unique)."""
    if path.is_file() and path.stat().st_size >= megabytes * 1_000_000:
        return path
    rng = random.Random(seed)
    partial = path.with_suffix(".partial")
    written, number = 0, 0
    with partial.open("w", encoding="utf-8") as sink:
        while written < megabytes * 1_000_000:
            number += 1
            sentences = [f"{rng.choice(TOPICS).capitalize()} {rng.choice(FACTS)}." for _ in range(rng.randint(3, 8))]
            line = f"Note {number}: " + " ".join(sentences) + f" (case {rng.randint(0, 10**9)})\n"
            sink.write(line)
            written += len(line.encode())
    partial.replace(path)
    return path


def write_conversations(path: Path, count: int, seed: int = 0) -> Path:
    if path.is_file() and sum(1 for _ in path.open("rb")) >= count:
        return path
    rng = random.Random(seed)
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as sink:
        for number in range(count):
            topic = rng.choice(TOPICS)
            turns = [{"from": "human", "value": f"Question {number}: what should I know about {topic}?"},
                     {"from": "gpt", "value": f"{topic.capitalize()} {rng.choice(FACTS)}; it {rng.choice(FACTS)}. "
                                              "See a doctor for advice about your own case."}]
            if number % 3 == 0:
                turns += [{"from": "human", "value": "And when is it an emergency?"},
                          {"from": "gpt", "value": "Chest pain, trouble breathing or fainting: call emergency services."}]
            sink.write(json.dumps({"conversations": turns}) + "\n")
    partial.replace(path)
    return path


# ---------------------------------------------------------------- one measurement (run in its own process)


def run_baseline_pt(corpus: str, block_size: int, num_proc: int) -> dict:
    """The reference toolkit's continued-pretraining data recipe with HF datasets."""
    from datasets import load_dataset
    from itertools import chain

    from medgpt.args import ModelArguments
    from medgpt.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelArguments())
    raw = load_dataset("text", data_files={"train": corpus}, split="train", cache_dir=os.environ["BENCH_HF_CACHE"])
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, num_proc=num_proc,
                        remove_columns=["text"], desc="baseline tokenize")

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        return {k: [t[i: i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}

    blocks = tokenized.map(group_texts, batched=True, num_proc=num_proc, desc="baseline group_texts")
    return {"blocks": len(blocks)}


def _stage_args(data_dir_or_file: str, cache: str, num_proc: int, **extra):
    from trl import SFTConfig

    from medgpt.args import DataArguments

    data_args = DataArguments(train_files=[data_dir_or_file], validation_split_percentage=0,
                              preprocessing_num_workers=num_proc, data_cache_dir=cache, on_invalid_record="skip")
    training_args = SFTConfig(output_dir=os.path.join(cache, "out"), report_to="none", use_cpu=True, **extra)
    return data_args, training_args


def run_medgpt_pt(corpus: str, block_size: int, num_proc: int, cache: str) -> dict:
    from medgpt.args import ModelArguments
    from medgpt.data_files import InvalidRecords
    from medgpt.modeling import load_tokenizer
    from medgpt.tokenization import prepare_pretraining_data

    tokenizer = load_tokenizer(ModelArguments())
    data_args, training_args = _stage_args(corpus, cache, num_proc)
    train, _, counts = prepare_pretraining_data(data_args, training_args, tokenizer, block_size, False,
                                                InvalidRecords("skip", 1.0, cache))
    return {"blocks": len(train), "tokens": counts.get("train_tokens")}


def run_medgpt_sft(conversations: str, max_length: int, num_proc: int, cache: str) -> dict:
    from medgpt.args import ModelArguments
    from medgpt.data_files import InvalidRecords
    from medgpt.modeling import load_template, load_tokenizer
    from medgpt.tokenization import prepare_sft_data

    model_args = ModelArguments()
    tokenizer = load_tokenizer(model_args)
    template = load_template(model_args, tokenizer)
    data_args, training_args = _stage_args(conversations, cache, num_proc, max_length=max_length, packing=True)
    train, _, counts = prepare_sft_data(data_args, training_args, tokenizer, template, InvalidRecords("skip", 1.0, cache))
    return {"conversations": counts["train_records_kept"] + counts["train_records_cut"], "packed_rows": len(train)}


def run_baseline_sft(conversations: str, max_length: int, num_proc: int) -> dict:
    """The reference toolkit's SFT data path: load_dataset("json") + map(preprocess, batched, num_proc)."""
    from datasets import load_dataset

    from medgpt.args import ModelArguments
    from medgpt.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelArguments())
    roles = {"human": "user", "gpt": "assistant"}
    raw = load_dataset("json", data_files={"train": conversations}, split="train",
                       cache_dir=os.environ["BENCH_HF_CACHE"])

    def preprocess(batch):
        texts = [tokenizer.apply_chat_template([{"role": roles[t["from"]], "content": t["value"]} for t in turns],
                                               tokenize=False) for turns in batch["conversations"]]
        return tokenizer(texts, truncation=True, max_length=max_length)

    tokenized = raw.map(preprocess, batched=True, num_proc=num_proc, remove_columns=raw.column_names,
                        desc="baseline SFT tokenize")
    return {"conversations": len(tokenized)}


def child(argv: list[str]) -> None:
    kind, *args = argv
    start = time.perf_counter()
    runner = {"baseline_pt": run_baseline_pt, "medgpt_pt": run_medgpt_pt, "medgpt_sft": run_medgpt_sft,
              "baseline_sft": run_baseline_sft}[kind]
    typed = [int(a) if a.isdigit() else a for a in args]
    result = runner(*typed)
    main, children = peak_rss_gib()
    print("RESULT " + json.dumps({**result, "seconds": time.perf_counter() - start, "rss_main_gib": main,
                                  "rss_worker_gib": children}), flush=True)


def measure(kind: str, *args) -> dict:
    process = subprocess.run([sys.executable, __file__, "--_child", kind, *map(str, args)], capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    line = next((line for line in process.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{kind} failed:\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}")
    return json.loads(line[len("RESULT "):])


def report(name: str, row: dict) -> None:
    print(f"  {name:<26} {row['seconds']:8.1f} s   peak RSS main {row['rss_main_gib']:5.2f} GiB   "
          f"largest worker {row['rss_worker_gib']:5.2f} GiB", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--_child"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[100, 1000], help="PT corpus sizes in MB.")
    parser.add_argument("--sft_records", type=int, default=1_000_000, help="Generated SFT conversations (0: skip).")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--num_proc", type=int, default=2, help="datasets.map processes, the same on both sides.")
    parser.add_argument("--workdir", default="/tmp/medgpt-data-scale", help="Corpora and caches (GBs for 1 GB).")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_HF_CACHE"] = str(work / "hf_cache")
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")  # both sides start cold; cleared before each pair
    pt_rows = {}
    for size in args.sizes_mb:
        corpus = write_corpus(work / f"corpus_{size}mb.txt", size)
        print(f"PT data preparation, {size} MB corpus ({corpus}), block {args.block_size}, num_proc {args.num_proc}:")
        baseline, first, again = compare("pt", corpus, args.block_size, args.num_proc, work / f"cache_pt_{size}")
        print(f"  blocks {first['blocks']} vs {baseline['blocks']} (the baseline drops each batch's remainder)")
        pt_rows[size] = first
    if len(pt_rows) >= 2:
        small, large = min(pt_rows), max(pt_rows)
        print(f"PT peak RSS, {large} MB vs {small} MB: {pt_rows[large]['rss_main_gib'] / pt_rows[small]['rss_main_gib']:.2f}x "
              f"(target: within 1.2x; at most 2.5 GiB for 1 GB: {pt_rows[large]['rss_main_gib']:.2f} GiB)")
    if args.sft_records:
        conversations = write_conversations(work / f"conversations_{args.sft_records}.jsonl", args.sft_records)
        print(f"SFT data preparation (+ packing), {args.sft_records} conversations, max_length {args.max_length}:")
        _, first, _ = compare("sft", conversations, args.max_length, args.num_proc, work / "cache_sft")
        print(f"  {first['conversations']} conversations in {first['packed_rows']} packed rows; target: at most "
              f"3 GiB ({first['rss_main_gib']:.2f} GiB)")


def compare(kind: str, data: Path, length: int, num_proc: int, cache: Path) -> tuple[dict, dict, dict]:
    """The baseline, MedGPT cold and MedGPT with its cache warm, each in its own process; ratios printed."""
    subprocess.run(["rm", "-rf", str(cache), os.environ["BENCH_HF_CACHE"]], check=True)
    baseline = measure(f"baseline_{kind}", data, length, num_proc)
    report("baseline (datasets.map)", baseline)
    first = measure(f"medgpt_{kind}", data, length, num_proc, cache)
    report("medgpt, first run", first)
    again = measure(f"medgpt_{kind}", data, length, num_proc, cache)
    report("medgpt, cache warm", again)
    print(f"  ratios: medgpt/baseline peak RSS {first['rss_main_gib'] / baseline['rss_main_gib']:.2f}x, seconds "
          f"{first['seconds'] / baseline['seconds']:.2f}x; a second run starts {first['seconds'] / again['seconds']:.1f}x "
          "faster (target: 5x)")
    return baseline, first, again

if __name__ == "__main__":
    main()
