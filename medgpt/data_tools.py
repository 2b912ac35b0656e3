"""Data tools: check, convert, deduplicate, mix and generate training data.

    python -m medgpt.data_tools validate --inputs data/sft data/preference
    python -m medgpt.data_tools convert --inputs alpaca.jsonl --output sharegpt.jsonl --to sharegpt
    python -m medgpt.data_tools dedup --inputs data/sft/train --output outputs/sft_dedup.jsonl
    python -m medgpt.data_tools mix --sources data/sft/train=0.8 general.jsonl=0.2 --output outputs/mixed.jsonl
    python -m medgpt.data_tools self-instruct --inputs data/rag/knowledge_base --output outputs/generated_sft.jsonl

Each command has its own --help. They read the same formats, with the same validators and
file:line error reports, as the training scripts (see medgpt/records.py for the formats).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from medgpt.args import ModelArguments, parse_args
from medgpt.chat_template import inline_reasoning
from medgpt.data_files import find_files, mix_plan, read_json_records, text_document_reader
from medgpt.generation import GenerationArguments
from medgpt.records import (
    Conversation,
    DataError,
    Problem,
    Record,
    check_turn_order,
    conversation_from_record,
    preference_from_record,
    question_from_record,
)

logger = logging.getLogger(__name__)

JSON_EXTENSIONS = (".jsonl", ".json")
PREFERENCE_KEYS = ("chosen", "rejected", "response_chosen", "response_rejected")
# keys each input format consumes; any other key of a record is carried over unchanged by convert
FORMAT_KEYS = {"conversations", "messages", "instruction", "input", "output", "system", "history", "question",
               "answer", "问", "答", "prompt", "tools", *PREFERENCE_KEYS}


# ---------------------------------------------------------------- reading any kind of record


def detect_kind(data: dict) -> str:
    """sft, preference, question (multiple choice: it has options) or text, from a record's keys."""
    if any(key in data for key in PREFERENCE_KEYS):
        return "preference"
    if "question" in data and "options" in data:
        return "question"
    if "text" in data and not any(key in data for key in ("conversations", "messages", "instruction", "question")):
        return "text"
    return "sft"


def _text_record(data: dict) -> str:
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("needs a non-empty 'text' string.")
    return text


CONVERTERS: dict[str, Callable[[dict], object]] = {
    "sft": conversation_from_record,
    "preference": preference_from_record,
    "question": question_from_record,
    "text": _text_record,
}


def expand_inputs(inputs: list[str], extensions: tuple[str, ...], flag: str = "--inputs") -> list[Path]:
    """Files named, and files found (recursively) in folders named; a clear error for anything missing."""
    return find_files(inputs, extensions, flag)


def read_checked(paths: list[Path], kind: str) -> tuple[list[tuple[Record, str, object]], list[str]]:
    """Every record with its kind and converted form, plus every problem (file:line: what is wrong).

    ``kind`` auto detects each record's kind; .txt files are pretraining text (a document a line)."""
    problems: list[str] = []
    checked = []
    for path in paths:
        if path.suffix.lower() == ".txt":
            try:
                for source, text in text_document_reader()([path]):
                    checked.append((Record(source, {"text": text}), "text", text))
            except DataError as error:
                problems += error.problems
            continue
        for record in read_json_records([path], problems):
            record_kind = detect_kind(record.data) if kind == "auto" else kind
            try:
                checked.append((record, record_kind, CONVERTERS[record_kind](record.data)))
            except ValueError as error:
                problems.append(Problem(f"{record.source}: {error} (read as {record_kind} data)", record.source,
                                        record.data))
    return checked, problems


def _fail(problems: list[str], what: str) -> None:
    if problems:
        raise DataError(problems, what=what, outcome="nothing was written")


def overwrite_field():
    return field(default=False, metadata={
        "help": "Write the output even when it is one of the inputs or lies in an input folder (refused otherwise: "
                "it would replace the records read, or be read back as input next time)."})


def refuse_overwriting_inputs(outputs: Sequence[tuple[str, str | None]], inputs: Sequence[str], files: Sequence[Path],
                              overwrite: bool) -> None:
    """Stop, naming the flag and the file, when an output (flag, path) is one of the input files or lies in an input
    folder, links followed; ``--overwrite true`` allows it."""
    folders = [Path(name) for name in inputs if Path(name).is_dir()]
    sources = {path.resolve(): path for path in files}
    for flag, output in outputs:
        if output and Path(output).is_dir():
            raise SystemExit(f"{flag} {output} is a folder: give the path of a .jsonl file.")
        if not output or overwrite:
            continue
        target = Path(output).resolve()
        if target in sources:
            raise SystemExit(f"{flag} {output} is the input file {sources[target]}: writing it would replace the records "
                             "read from it. Write to another file, or pass --overwrite true.")
        for folder in folders:
            if target.is_relative_to(folder.resolve()):
                raise SystemExit(f"{flag} {output} is inside the input folder {folder}: a later run on that folder "
                                 "would read it back as input. Write elsewhere, or pass --overwrite true.")


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write through a temporary file in the same folder, renamed at the end (os.replace): an interrupted run
    leaves the previous file (or none), never a half-written one."""
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as sink:
            for row in rows:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------- validate


@dataclass
class ValidateArguments:
    """Check data files with the training validators; every problem is listed with its file and line."""

    inputs: list[str] = field(metadata={"help": "Files or folders (.jsonl, .json, .txt), searched recursively."})
    kind: str = field(default="auto", metadata={
        "help": "auto (per record: preference if chosen/rejected, question if question and options, text if only "
                "text, else SFT), sft, "
                "preference, question (GRPO/evaluation questions with checkable answers) or text."})

    on_invalid_record: str = field(default="error", metadata={
        "help": "error: report every invalid record (exit status 1). skip: write the valid records to --output and "
                "each invalid one, with its file:line and the reason, to OUTPUT.invalid_records.jsonl (exit status 0)."})
    output: str | None = field(default=None, metadata={
        "help": "With --on_invalid_record skip: the .jsonl file for the clean records (as they were written)."})
    overwrite: bool = overwrite_field()

    def __post_init__(self):
        if self.kind not in ("auto", *CONVERTERS):
            raise ValueError(f"--kind {self.kind}: use auto, {', '.join(CONVERTERS)}.")
        if self.on_invalid_record not in ("error", "skip"):
            raise ValueError(f"--on_invalid_record {self.on_invalid_record}: use error or skip.")
        if self.on_invalid_record == "skip" and not self.output:
            raise ValueError("--on_invalid_record skip writes the clean records: give --output FILE.jsonl.")


def invalid_records_path(output: str) -> Path:
    return Path(output).with_suffix(".invalid_records.jsonl")


def validate(args: ValidateArguments) -> int:
    paths = expand_inputs(args.inputs, (*JSON_EXTENSIONS, ".txt"))
    if args.on_invalid_record == "skip":
        refuse_overwriting_inputs([("--output", args.output), ("--output", str(invalid_records_path(args.output)))],
                                  args.inputs, paths, args.overwrite)
    checked, problems = read_checked(paths, args.kind)
    per_file = Counter((record.source.rsplit(":", 1)[0].split("[")[0], kind) for record, kind, _ in checked)
    for (path, kind), count in sorted(per_file.items()):
        print(f"{path}: {count} {kind} records")
    if args.on_invalid_record == "skip":
        write_jsonl(args.output, [record.data for record, _, _ in checked])
        rejected = invalid_records_path(args.output)
        write_jsonl(str(rejected), [{"source": p.source, "reason": str(p)[len(p.source) + 2:], "record": p.raw}
                                    if getattr(p, "source", None) else {"source": None, "reason": str(p), "record": None}
                                    for p in problems])
        print(f"Wrote {len(checked)} valid records to {args.output} and {len(problems)} invalid ones, each with its "
              f"file:line and reason, to {rejected}.")
        return 0
    if problems:
        invalid = sum(1 for p in problems if getattr(p, "source", None))
        outcome = f"validated {len(paths)} file(s): {len(checked)} valid and {invalid} invalid record(s)"
        if len(problems) > invalid:
            outcome += f", {len(problems) - invalid} problem(s) with a whole file"
        print(DataError(problems, what="data", outcome=outcome), file=sys.stderr)
        return 1
    print(f"OK: {len(checked)} records in {len(paths)} files, no problems.")
    return 0


# ---------------------------------------------------------------- convert

TARGETS = ("sharegpt", "openai", "alpaca", "trl")


def _plain_answer(message: dict, target: str) -> str:
    """An assistant message as one text (its reasoning inline); formats without tool turns refuse calls."""
    if message.get("tool_calls"):
        raise ValueError(f"holds tool calls, which the {target} format cannot carry; convert to sharegpt or openai.")
    if message.get("reasoning_content"):
        return inline_reasoning(message["reasoning_content"], message["content"])
    return message["content"]


def _sharegpt_turns(messages: list[dict]) -> list[dict]:
    turns = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            turns.append({"from": "observation", "value": message["content"]})
        elif role == "assistant":
            if message["content"] or message.get("reasoning_content") or not message.get("tool_calls"):
                turns.append({"from": "gpt", "value": _plain_answer({**message, "tool_calls": None}, "sharegpt")})
            for call in message.get("tool_calls") or []:
                turns.append({"from": "function_call", "value": json.dumps(call["function"], ensure_ascii=False)})
        else:
            turns.append({"from": {"system": "system", "user": "human"}[role], "value": message["content"]})
    return turns


def to_sft_format(messages: list[dict], target: str) -> dict:
    """A conversation in one of the formats training reads (its tools, if any, as a top-level 'tools')."""
    tools = {"tools": messages.tools} if getattr(messages, "tools", None) else {}
    if target == "openai":
        return {"messages": list(messages), **tools}
    if target == "sharegpt":
        return {"conversations": _sharegpt_turns(messages), **tools}
    if target == "alpaca":
        if tools or any(m["role"] == "tool" for m in messages):
            raise ValueError("holds tool calls, which the alpaca format cannot carry; convert to sharegpt or openai.")
        system = [m["content"] for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        text = [_plain_answer(m, target) if m["role"] == "assistant" else m["content"] for m in turns]
        pairs = [[text[i], text[i + 1]] for i in range(0, len(turns) - 2, 2)]
        row = {"instruction": text[-2], "input": "", "output": text[-1]}
        return {**({"system": system[0]} if system else {}), **({"history": pairs} if pairs else {}), **row}
    raise ValueError(f"'{target}' is a preference format; SFT conversations convert to sharegpt, openai or alpaca.")


def to_preference_format(pair: dict, target: str) -> dict:
    """A preference pair in one of the formats the RM/DPO stages read."""
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    tools = {"tools": pair["tools"]} if pair.get("tools") else {}
    if target == "trl":
        return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected], **tools}
    if target == "alpaca":
        if tools:
            raise ValueError("declares tools, which the alpaca format cannot carry; convert to sharegpt or openai.")
        row = to_sft_format(prompt + [{"role": "assistant", "content": "-"}], "alpaca")
        row = {key: value for key, value in row.items() if key in ("system", "history")}
        return {**row, "question": prompt[-1]["content"], "response_chosen": _plain_answer(chosen, target),
                "response_rejected": _plain_answer(rejected, target)}

    def answer(message):
        if not message.get("tool_calls"):
            return _plain_answer(message, target)
        return _sharegpt_turns([message])[-1] if target == "sharegpt" else [message]

    prompt_format = to_sft_format(Conversation(prompt, pair.get("tools")), target)
    return {**prompt_format, "chosen": answer(chosen), "rejected": answer(rejected)}


@dataclass
class ConvertArguments:
    """Convert SFT conversations and preference pairs between formats; other keys of a record are kept."""

    inputs: list[str] = field(metadata={"help": "Files or folders of .jsonl/.json records (any supported format)."})
    output: str = field(metadata={"help": "The .jsonl file to write."})
    to: str = field(default="sharegpt", metadata={
        "help": "sharegpt (conversations), openai (messages), alpaca (instruction/output + history; preference: "
                "question/response_chosen/response_rejected) or trl (preference only: prompt/chosen/rejected "
                "message lists)."})
    kind: str = field(default="auto", metadata={"help": "auto (per record), sft or preference."})
    overwrite: bool = overwrite_field()

    def __post_init__(self):
        if self.to not in TARGETS:
            raise ValueError(f"--to {self.to}: use one of {', '.join(TARGETS)}.")
        if self.kind not in ("auto", "sft", "preference"):
            raise ValueError(f"--kind {self.kind}: use auto, sft or preference.")


def convert_record(record: Record, kind: str, converted, target: str) -> dict:
    extras = {key: value for key, value in record.data.items() if key not in FORMAT_KEYS}
    if kind == "preference":
        return {**to_preference_format(converted, target), **extras}
    if kind == "sft":
        return {**to_sft_format(converted, target), **extras}
    raise ValueError(f"is {kind} data, which has one format only; nothing to convert.")


def convert(args: ConvertArguments) -> int:
    paths = expand_inputs(args.inputs, JSON_EXTENSIONS)
    refuse_overwriting_inputs([("--output", args.output)], args.inputs, paths, args.overwrite)
    checked, problems = read_checked(paths, args.kind)
    rows = []
    for record, kind, converted in checked:
        try:
            rows.append(convert_record(record, kind, converted, args.to))
        except ValueError as error:
            problems.append(f"{record.source}: {error}")
    _fail(problems, "input")
    write_jsonl(args.output, rows)
    kinds = Counter(kind for _, kind, _ in checked)
    print(f"Wrote {len(rows)} records ({', '.join(f'{n} {k}' for k, n in kinds.items())}) as {args.to} to {args.output}")
    return 0


# ---------------------------------------------------------------- dedup


def record_text(kind: str, converted) -> str:
    """The text that makes two records the same: every turn (and both answers of a pair)."""
    if kind == "text":
        return converted
    if kind == "preference":
        return "\n".join(map(_message_text, [*converted["prompt"], converted["chosen"], converted["rejected"]]))
    if kind == "question":
        return "\n".join(m["content"] for m in converted["prompt"]) + "\n" + converted["answer"]
    return "\n".join(map(_message_text, converted))


def _message_text(message: dict) -> str:
    calls = [json.dumps(call["function"], ensure_ascii=False) for call in message.get("tool_calls") or []]
    return "\n".join([message.get("reasoning_content") or "", message["content"], *calls]).strip()


def normalize(text: str) -> str:
    """Lower case, punctuation and spacing removed: formatting differences do not make a record new."""
    return re.sub(r"[\W_]+", "", text.lower())


def shingles(text: str, size: int) -> set[str]:
    """Character n-grams of the normalized text: work for Chinese (no spaces) and English alike."""
    text = normalize(text)
    return {text[i : i + size] for i in range(max(1, len(text) - size + 1))}


@dataclass
class DedupArguments:
    """Remove exact and near-duplicate records (MinHash LSH over character shingles); the first copy is kept."""

    inputs: list[str] = field(metadata={"help": "Files or folders (.jsonl, .json, .txt)."})
    output: str = field(metadata={"help": "The .jsonl file of kept records, unchanged (.txt lines become {\"text\"})."})
    removed_output: str | None = field(default=None, metadata={
        "help": "Where removed records go, each with the source of the copy kept "
                "(default: OUTPUT with .removed.jsonl), so nothing is lost."})
    threshold: float = field(default=0.8, metadata={
        "help": "Estimated Jaccard similarity of shingle sets at which two records count as near duplicates."})
    shingle_size: int = field(default=5, metadata={"help": "Characters per shingle."})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations (more: more exact, slower)."})
    kind: str = field(default="auto", metadata={"help": "auto (per record), sft, preference, question or text."})
    seed: int = field(default=42, metadata={"help": "MinHash seed."})
    overwrite: bool = overwrite_field()

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold {self.threshold}: must be in (0, 1].")
        if self.shingle_size < 1 or self.num_perm < 2:
            raise ValueError("--shingle_size must be at least 1 and --num_perm at least 2.")
        self.removed_output = self.removed_output or re.sub(r"(\.jsonl?)?$", ".removed.jsonl", self.output, count=1)
        if Path(self.removed_output).resolve() == Path(self.output).resolve():
            raise ValueError(f"--removed_output {self.removed_output} is --output: the kept records would be "
                             "overwritten. Give it another file.")


def find_duplicates(texts: list[str], args: DedupArguments) -> dict[int, tuple[int, str]]:
    """For each duplicate record: (the index of the earlier record it repeats, 'exact' or 'near')."""
    from datasketch import MinHash, MinHashLSH

    duplicates: dict[int, tuple[int, str]] = {}
    first_of: dict[str, int] = {}
    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm)
    signatures: dict[int, MinHash] = {}
    for index, text in enumerate(texts):
        key = hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()
        if key in first_of:
            duplicates[index] = (first_of[key], "exact")
            continue
        first_of[key] = index
        signature = MinHash(num_perm=args.num_perm, seed=args.seed)
        signature.update_batch([s.encode("utf-8") for s in shingles(text, args.shingle_size)])
        # LSH candidates are likely matches; keep only those whose estimated similarity reaches the threshold
        matches = [int(c) for c in lsh.query(signature) if signatures[int(c)].jaccard(signature) >= args.threshold]
        if matches:
            duplicates[index] = (min(matches), "near")
            continue
        lsh.insert(str(index), signature)
        signatures[index] = signature
    return duplicates


def dedup(args: DedupArguments) -> int:
    paths = expand_inputs(args.inputs, (*JSON_EXTENSIONS, ".txt"))
    refuse_overwriting_inputs([("--output", args.output), ("--removed_output", args.removed_output)], args.inputs,
                              paths, args.overwrite)
    checked, problems = read_checked(paths, args.kind)
    _fail(problems, "input")
    duplicates = find_duplicates([record_text(kind, converted) for _, kind, converted in checked], args)
    kept = [record.data for index, (record, _, _) in enumerate(checked) if index not in duplicates]
    removed = [{**checked[index][0].data, "duplicate_of": checked[first][0].source, "duplicate": how,
                "source_line": checked[index][0].source} for index, (first, how) in sorted(duplicates.items())]
    write_jsonl(args.output, kept)
    write_jsonl(args.removed_output, removed)
    counts = Counter(how for _, how in duplicates.values())
    print(f"{len(checked)} records: {counts['exact']} exact and {counts['near']} near duplicates removed "
          f"(threshold {args.threshold}), {len(kept)} kept.")
    print(f"Kept -> {args.output}; removed (with the record each repeats) -> {args.removed_output}")
    return 0


# ---------------------------------------------------------------- mix


@dataclass
class MixArguments:
    """Build one training set from several sources in given proportions (e.g. medical + general data,
    which limits forgetting of general skills after domain fine-tuning). Seeded; records are written in
    one format (OpenAI messages for SFT) so the result is uniform."""

    sources: list[str] = field(metadata={
        "help": "PATH=WEIGHT pairs (files or folders); weights are relative, e.g. data/sft/train=0.8 general.jsonl=0.2."})
    output: str = field(metadata={"help": "The .jsonl file to write."})
    size: int | None = field(default=None, metadata={
        "help": "Records to write (default: the most possible without repeating any source's records)."})
    allow_repeats: bool = field(default=True, metadata={
        "help": "When --size needs more records than a source has, repeat its records (reported). False: an error."})
    seed: int = field(default=42, metadata={"help": "Random seed for sampling and shuffling."})
    overwrite: bool = overwrite_field()

    def __post_init__(self):
        if self.size is not None and self.size < 1:
            raise ValueError(f"--size {self.size}: must be a positive number of records (or leave it out).")

    def parsed_sources(self) -> list[tuple[str, float]]:
        pairs, problems = [], []
        for item in self.sources:
            path, _, weight = item.rpartition("=")
            try:
                value = float(weight)
                if not path or not 0 < value < float("inf"):
                    raise ValueError
                pairs.append((path, value))
            except ValueError:
                problems.append(f"--sources {item}: expected PATH=WEIGHT with a positive weight, e.g. data/sft/train=0.8.")
        _fail(problems, "--sources arguments")
        return pairs


def mix(args: MixArguments) -> int:
    sources = args.parsed_sources()
    files = [expand_inputs([path], JSON_EXTENSIONS, "--sources") for path, _ in sources]
    refuse_overwriting_inputs([("--output", args.output)], [path for path, _ in sources],
                              [path for paths in files for path in paths], args.overwrite)
    pools, problems = [], []
    for paths in files:
        checked, found = read_checked(paths, "auto")
        problems += found
        pools.append(checked)
    _fail(problems, "sources")
    kinds = {kind for pool in pools for _, kind, _ in pool}
    if len(kinds) != 1:
        raise SystemExit(f"--sources mix kinds of data ({', '.join(sorted(kinds))}); mix one kind at a time.")
    kind = kinds.pop()
    wants = mix_plan([len(pool) for pool in pools], [weight for _, weight in sources], args.size)
    size = sum(wants)
    rng = random.Random(args.seed)
    rows = []
    for (path, _), pool, want in zip(sources, pools, wants):
        share = want / max(size, 1)
        if want > len(pool) and not args.allow_repeats:
            raise SystemExit(f"--sources {path}: {want} records needed for --size {size}, it has {len(pool)}; "
                             "lower --size or pass --allow_repeats true.")
        picked = [pool[i] for i in rng.sample(range(len(pool)), len(pool))] * (want // len(pool))
        picked += [pool[i] for i in rng.sample(range(len(pool)), want % len(pool))]
        repeated = max(0, want - len(pool))
        print(f"{path}: {len(pool)} records, took {want} ({share:.0%})" + (f", {repeated} of them repeats" if repeated else ""))
        for record, record_kind, converted in picked:
            rows.append(record.data if kind in ("text", "question") else convert_record(record, record_kind, converted, "openai"))
    rng.shuffle(rows)
    write_jsonl(args.output, rows)
    print(f"Wrote {len(rows)} {kind} records to {args.output} (seed {args.seed}).")
    return 0


# ---------------------------------------------------------------- self-instruct

QUESTION_PROMPTS = {
    "en": ("Read this medical text.\n\n{text}\n\nWrite {n} question(s) that a doctor or patient might ask and "
           "that need real medical understanding to answer (why something happens, how it is diagnosed or treated, "
           "dose limits, warning signs), and that the text answers. One question per line, each ending with '?'."),
    "zh": ("阅读下面的医学资料。\n\n{text}\n\n请提出{n}个医生或患者可能会问、需要医学理解才能回答的问题（如机制、诊断、治疗、"
           "剂量上限、危险信号），且资料中有答案。每行一个问题，以问号结尾。"),
}
ANSWER_PROMPTS = {
    "en": ("Answer the question using only this medical text. Be accurate and cautious; if the text does not "
           "answer it, say so.\n\nText:\n{text}\n\nQuestion: {question}"),
    "zh": "请只根据下面的医学资料回答问题，准确、谨慎；资料中没有答案就直接说明。\n\n资料：\n{text}\n\n问题：{question}",
}
_QUESTION = re.compile(r"[^?？\n]+[?？]")
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.、)]|Q\d*[:：]|Question\s*\d*[:：]|问题?\d*[:：])?\s*", re.IGNORECASE)


def parse_questions(text: str, limit: int) -> list[str]:
    """Questions from a model's output: the sentences ending with a question mark (several may share a
    line), list markers removed, no repeats."""
    found = []
    for match in _QUESTION.finditer(text):
        question = _LIST_MARKER.sub("", match.group()).strip()
        if len(question) >= 6 and question not in found:
            found.append(question)
    return found[:limit]


@dataclass
class SelfInstructArguments:
    """Generate question/answer pairs from document text with a model, written as SFT conversations
    (OpenAI messages, each with the passage's source): the model writes questions a passage answers,
    then answers each from the passage. Review generated data before training on it."""

    inputs: list[str] = field(metadata={"help": "Documents: files or folders of .txt, .md, .pdf, .docx."})
    output: str = field(default="outputs/self_instruct.jsonl", metadata={"help": "The .jsonl file to write."})
    questions_per_passage: int = field(default=2, metadata={"help": "Questions asked for per passage (1-2 is best)."})
    chunk_size: int = field(default=800, metadata={"help": "Characters of text per passage."})
    max_passages: int | None = field(default=None, metadata={"help": "Use only the first N passages (quick runs)."})
    batch_size: int = field(default=4, metadata={"help": "Passages generated for together."})
    seed: int = field(default=42, metadata={"help": "Random seed for sampling."})
    overwrite: bool = overwrite_field()


def self_instruct(model_args: ModelArguments, generation_args: GenerationArguments, args: SelfInstructArguments) -> int:
    from tqdm import tqdm
    from transformers import set_seed

    from medgpt.generation import ChatModel
    from medgpt.rag import DOCUMENT_EXTENSIONS, Chunk, chunk_document, language_of

    passages: list[Chunk] = []
    problems = []
    documents = expand_inputs(args.inputs, DOCUMENT_EXTENSIONS)
    refuse_overwriting_inputs([("--output", args.output)], args.inputs, documents, args.overwrite)
    for path in documents:
        try:
            passages += chunk_document(path, str(path), args.chunk_size, 0)
        except ValueError as error:
            problems.append(f"{path}: {error}")
    _fail(problems, "documents")
    passages = passages[: args.max_passages]
    set_seed(args.seed)
    chat = ChatModel.load(model_args)
    rows, unusable = [], 0
    for start in tqdm(range(0, len(passages), args.batch_size), desc="Generating", unit="batch"):
        batch = passages[start : start + args.batch_size]
        # two steps, which even small models follow: questions about the passage, then answers grounded in it
        asked = chat.generate([[{"role": "user", "content": QUESTION_PROMPTS[language_of(p.text)].format(
            text=p.text, n=args.questions_per_passage)}] for p in batch], generation_args)
        questions = [(p, q) for p, output in zip(batch, asked) for q in parse_questions(output, args.questions_per_passage)]
        unusable += sum(not parse_questions(output, 1) for output in asked)
        answers = chat.generate([[{"role": "user", "content": ANSWER_PROMPTS[language_of(q)].format(
            text=p.text, question=q)}] for p, q in questions], generation_args) if questions else []
        for (passage, question), answer in zip(questions, answers):
            if len(answer.strip()) < 5:
                continue
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer.strip()}]
            check_turn_order(messages)
            rows.append({"messages": messages, "source": passage.where()})
    write_jsonl(args.output, rows)
    print(f"{len(passages)} passages -> {len(rows)} question/answer pairs written to {args.output}; "
          f"{unusable} passages gave no usable question. Review them before training: a model can be wrong.")
    return 0


# ---------------------------------------------------------------- the command line

COMMANDS = {
    "validate": ((ValidateArguments,), validate),
    "convert": ((ConvertArguments,), convert),
    "dedup": ((DedupArguments,), dedup),
    "mix": ((MixArguments,), mix),
    "self-instruct": ((ModelArguments, GenerationArguments, SelfInstructArguments), self_instruct),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [__doc__.strip(), "", "Commands:"]
        lines += [f"  {name:14s} {types[-1].__doc__.splitlines()[0]}" for name, (types, _) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nUnknown command '{argv[0]}'.", file=sys.stderr)
            return 2
        return 0 if argv else 2
    types, run = COMMANDS[argv[0]]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parsed = parse_args(types, argv[1:], description=types[-1].__doc__)[:-1]
    try:
        return run(*parsed)
    except DataError as error:
        print(error, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
