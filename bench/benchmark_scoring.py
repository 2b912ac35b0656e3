"""Benchmark scoring throughput: batched option likelihoods against one item at a time, in one run.

    .venv/bin/python bench/benchmark_scoring.py                       # embedded model, ~200 items
    .venv/bin/python bench/benchmark_scoring.py --items 400 --batch_size 16 --model outputs/sft-merged

Both score the same items (the shipped samples of every format in data/benchmarks/, repeated to --items)
through evaluation.py's choice_loglik_predictions, as evaluate_model.py --benchmark_files does. Prints items
per second for each, the ratio, and whether both chose the same letters.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLES = ["medqa/test.jsonl", "medmcqa/dev.json", "pubmedqa/test_set.json", "cmexam/test.csv",
           "cmb/CMB-val-merge.json", "ceval/val", "cmmlu/test", "mmlu/test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder (default: the embedded model).")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    import torch

    from medgpt.args import ModelArguments
    from medgpt.benchmarks import benchmark_question, read_benchmark
    from medgpt.evaluation import choice_loglik_predictions
    from medgpt.generation import ChatModel

    torch.manual_seed(0)
    questions = [benchmark_question(item) for name in SAMPLES
                 for item in read_benchmark(str(ROOT / "data/benchmarks" / name))["items"]]
    questions = (questions * (args.items // len(questions) + 1))[: args.items]
    multi = sum(len(q["answer"]) > 1 for q in questions)
    chat = ChatModel.load(ModelArguments(model_name_or_path=args.model))
    choice_loglik_predictions(chat, questions[:2], 1)  # warm-up

    rates, chosen = {}, {}
    for name, size in (("one at a time", 1), (f"batch of {args.batch_size}", args.batch_size)):
        start = time.perf_counter()
        chosen[name] = choice_loglik_predictions(chat, questions, size, desc=name)
        seconds = time.perf_counter() - start
        rates[name] = len(questions) / seconds
        print(f"{name:>14}: {len(questions)} items in {seconds:.1f}s = {rates[name]:.1f} items/s")
    single, batched = rates.values()
    same = sum(a == b for a, b in zip(*chosen.values()))
    print(f"\nbatched / one at a time: {batched / single:.2f}x items/s ({len(questions)} items, {multi} multi-answer, "
          f"{'GPU' if torch.cuda.is_available() else 'CPU'}, {torch.get_num_threads()} threads); "
          f"same choice on {same}/{len(questions)} items")


if __name__ == "__main__":
    main()
