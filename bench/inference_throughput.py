"""Inference throughput: batched generation against one request at a time, in one run.

    .venv/bin/python bench/inference_throughput.py                   # embedded model, shipped eval questions
    .venv/bin/python bench/inference_throughput.py --questions 16 --batch_size 8 --max_new_tokens 64

Both answer the same held-out questions greedily with the same settings through MedGPT's one
generation path (medgpt/generation.py, as inference.py, the web demo and the API use it). Prints
generated tokens per second for each and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder (default: the embedded model).")
    parser.add_argument("--data_dir", default=str(ROOT / "data/sft/eval"))
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    from medgpt.args import ModelArguments
    from medgpt.data_files import find_data_files, qa_reader
    from medgpt.generation import ChatModel, GenerationArguments

    torch.manual_seed(0)
    items = [item for _, item in qa_reader(find_data_files(args.data_dir, None, (".jsonl",), "eval"))]
    conversations = [item["messages"] for item in items[: args.questions]]
    chat = ChatModel.load(ModelArguments(model_name_or_path=args.model))
    settings = GenerationArguments(max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    chat.complete(conversations[:1], settings)  # warm-up

    results = {}
    for name, size in (("one at a time", 1), (f"batch of {args.batch_size}", args.batch_size)):
        start, tokens = time.perf_counter(), 0
        for first in range(0, len(conversations), size):
            tokens += sum(c.completion_tokens for c in chat.complete(conversations[first : first + size], settings))
        seconds = time.perf_counter() - start
        results[name] = tokens / seconds
        print(f"{name:>14}: {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} generated tokens/s")
    single, batched = results.values()
    print(f"\nbatched / one at a time: {batched / single:.2f}x generated tokens/s "
          f"({len(conversations)} questions, {args.max_new_tokens} new tokens max, "
          f"{'GPU' if torch.cuda.is_available() else 'CPU'})")


if __name__ == "__main__":
    main()
