"""Chat with a trained model, or answer a file of questions in batches.

    python inference.py --base_model outputs/sft-merged --interactive
    python inference.py --base_model BASE --lora_model outputs/sft --data_file questions.jsonl --output_file answers.jsonl

Interactive mode streams answers and keeps the conversation; type `clear` to start over and
`exit` (or Ctrl-D) to quit. Batch mode reads plain-text lines (one question each) or .jsonl
records with a `question` field (any SFT conversation format works too: the last user turn is
asked, earlier turns are context, a final assistant answer is kept as `reference`), and writes
one JSON line per input with the `answer`.

Answers come from a language model: they can be wrong and are not medical advice.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from medgpt.args import ModelArguments, parse_args
from medgpt.datasets import DataError, check_turn_order, read_json_records, record_to_messages
from medgpt.generation import DISCLAIMER, ChatModel, GenerationArguments


@dataclass
class InferenceArguments:
    """What to run: an interactive chat or a batch file."""

    interactive: bool = field(default=False, metadata={"help": "Chat in the terminal with streamed answers."})
    data_file: str | None = field(default=None, metadata={"help": "Questions: .txt (one per line) or .jsonl."})
    output_file: str = field(default="outputs/predictions.jsonl", metadata={"help": "Where batch answers go (.jsonl)."})
    batch_size: int = field(default=8, metadata={"help": "Questions generated together in batch mode."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})
    seed: int = field(default=42, metadata={"help": "Random seed for sampling."})


def read_questions(path: str) -> list[dict]:
    """Items with `messages` (the prompt turns) and, where the file has one, a `reference` answer."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--data_file {path}: no such file.")
    if file.suffix.lower() not in (".jsonl", ".json"):
        lines = file.read_text(encoding="utf-8").splitlines()
        return [{"messages": [{"role": "user", "content": line.strip()}]} for line in lines if line.strip()]
    problems: list[str] = []
    items = []
    for record in read_json_records([file], problems):
        try:
            data = record.data
            if "question" in data and "answer" not in data:  # a bare question, no reference answer
                messages = [{"role": "user", "content": data["question"]}]
            else:
                messages = record_to_messages(data)
            item = {"source": record.source}
            if messages[-1]["role"] == "assistant":
                item["reference"] = messages[-1]["content"]
                messages = messages[:-1]
            check_turn_order(messages, last_role="user")
            items.append({**item, "messages": messages})
        except ValueError as error:
            problems.append(f"{record.source}: {error}")
    if problems:
        raise DataError(problems, what="--data_file")
    return items


def run_batch(chat: ChatModel, args: InferenceArguments, settings: GenerationArguments) -> None:
    items = read_questions(args.data_file)
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as sink:
        for start in tqdm(range(0, len(items), args.batch_size), desc="Generating", unit="batch"):
            chunk = items[start : start + args.batch_size]
            answers = chat.generate([item["messages"] for item in chunk], settings)
            for item, answer in zip(chunk, answers):
                row = {"question": item["messages"][-1]["content"], "answer": answer}
                if "reference" in item:
                    row["reference"] = item["reference"]
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"Wrote {len(items)} answers to {output}")


def run_interactive(chat: ChatModel, settings: GenerationArguments) -> None:
    print(DISCLAIMER)
    print("Type your question. Commands: clear (new conversation), exit (quit).\n")
    history: list[dict] = []
    while True:
        try:
            question = input("User: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not question:
            continue
        if question.lower() in ("exit", "quit", "/exit", "/quit"):
            return
        if question.lower() in ("clear", "/clear"):
            history = []
            print("(conversation cleared)\n")
            continue
        history.append({"role": "user", "content": question})
        print("Assistant: ", end="", flush=True)
        answer = ""
        for piece in chat.stream(history, settings):
            answer += piece
            print(piece, end="", flush=True)
        print("\n")
        history.append({"role": "assistant", "content": answer.strip()})


def main(argv: list[str] | None = None) -> None:
    model_args, generation_args, args, _ = parse_args(
        (ModelArguments, GenerationArguments, InferenceArguments), argv, description=__doc__
    )
    if not args.interactive and not args.data_file:
        raise SystemExit("Nothing to do: pass --interactive for a chat, or --data_file FILE for batch answers.")
    from transformers import set_seed

    set_seed(args.seed)
    chat = ChatModel.load(model_args, device=args.device)
    if args.data_file:
        run_batch(chat, args, generation_args)
    if args.interactive:
        run_interactive(chat, generation_args)


if __name__ == "__main__":
    main(sys.argv[1:])
