"""Find data files, read and validate records, convert the formats users bring, tokenize.

Every problem in the input is collected and reported at once, each naming the file and line
and what to fix, before any training starts. Nothing is dropped silently: records skipped on
purpose are counted and reported.

Conversation formats, detected per record:

- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system"|"user"|"assistant", "value": ...}]}``
- OpenAI:   ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``
- Alpaca:   ``{"instruction", "input"?, "output", "system"?, "history"?: [[question, answer], ...]}``
- Q/A:      ``{"question", "answer"}`` (also ``{"问", "答"}``), with an optional ``system``
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 100

_ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class DataError(ValueError):
    """Problems found in the user's data, all of them, one per line."""

    def __init__(self, problems: Sequence[str], what: str = "data"):
        self.problems = list(problems)
        shown = self.problems[:MAX_REPORTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        text = f"Found {len(self.problems)} problem(s) in the {what}; nothing was trained. Fix these and rerun:\n"
        text += "\n".join(f"  - {p}" for p in shown)
        if more:
            text += f"\n  ... and {more} more of the same kinds (the first {len(shown)} are shown)."
        super().__init__(text)


@dataclass
class Record:
    """One JSON object from a data file, with where it came from."""

    source: str  # "path:line" (or "path[index]" inside a JSON array)
    data: dict


# ---------------------------------------------------------------- files


def find_data_files(
    directory: str | None, files: Sequence[str] | None, extensions: Sequence[str], flag: str
) -> list[Path]:
    """Files from a folder (searched recursively) plus an explicit list; a clear error if none."""
    found: list[Path] = []
    problems = []
    if directory:
        root = Path(directory)
        if not root.is_dir():
            problems.append(f"--{flag}_file_dir {directory}: no such folder.")
        else:
            found += sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                problems.append(
                    f"--{flag}_file_dir {directory}: no {'/'.join(extensions)} files found in it or its subfolders."
                )
    for name in files or []:
        path = Path(name)
        if not path.is_file():
            problems.append(f"--{flag}_files {name}: no such file.")
        elif path.suffix.lower() not in extensions:
            problems.append(f"--{flag}_files {name}: expected a {'/'.join(extensions)} file.")
        else:
            found.append(path)
    if problems:
        raise DataError(problems, what=f"{flag} file arguments")
    return found


def read_json_records(paths: Iterable[Path], problems: list[str]) -> list[Record]:
    """Read .jsonl (one object per line) and .json (an array of objects, or JSON lines) files.

    Malformed JSON, non-UTF-8 bytes, empty files and non-object records are added to
    ``problems`` with their file and line; good records are returned.
    """
    records: list[Record] = []
    for path in paths:
        raw = path.read_bytes()
        if not raw.strip():
            problems.append(f"{path}: the file is empty.")
            continue
        if path.suffix.lower() == ".json" and raw.lstrip()[:1] == b"[":
            records += _read_json_array(path, raw, problems)
            continue
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                problems.append(
                    f"{where}: not UTF-8 text (byte 0x{line[error.start]:02x} at column {error.start + 1}). "
                    "Re-save the file as UTF-8."
                )
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: not valid JSON ({error.msg} at column {error.colno}).")
                continue
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a JSON object {{...}}, got {type(value).__name__}.")
                continue
            records.append(Record(where, value))
    return records


def _read_json_array(path: Path, raw: bytes, problems: list[str]) -> list[Record]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        problems.append(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x}). Re-save the file as UTF-8.")
        return []
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        problems.append(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno}).")
        return []
    out = []
    for index, value in enumerate(values):
        where = f"{path}[{index}]"
        if isinstance(value, dict):
            out.append(Record(where, value))
        else:
            problems.append(f"{where}: expected a JSON object {{...}}, got {type(value).__name__}.")
    return out


# ---------------------------------------------------------------- conversations


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise ValueError(f"{what} is empty.")
    return value


def _turns(items, key: str, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"'{key}' must be a non-empty list of turns.")
    messages = []
    for index, turn in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} must be an object with '{role_key}' and '{content_key}'.")
        role = turn.get(role_key, turn.get("role", turn.get("from")))
        content = turn.get(content_key, turn.get("content", turn.get("value")))
        if role not in _ROLE_NAMES:
            raise ValueError(
                f"{where} has unknown role {role!r}; use one of system, human or user, gpt or assistant."
            )
        messages.append({"role": _ROLE_NAMES[role], "content": _text(content, f"{where} text")})
    return messages


def record_to_messages(data: dict) -> list[dict]:
    """Convert one record of any supported format to OpenAI-style messages (not yet order-checked)."""
    formats = [key for key in ("conversations", "messages", "instruction") if key in data]
    if len(formats) > 1:
        raise ValueError(f"has both {' and '.join(map(repr, formats))}; one record holds one format.")
    if "conversations" in data or "messages" in data:
        turns = (_turns(data["conversations"], "conversations", "from", "value") if "conversations" in data
                 else _turns(data["messages"], "messages", "role", "content"))
        system = _system(data)  # a top-level system prompt (LLaMA-Factory's ShareGPT layout)
        if system and turns and turns[0]["role"] == "system":
            raise ValueError("has a top-level 'system' and a system turn; keep one of them.")
        return system + turns
    if "instruction" in data or "output" in data:
        return _alpaca_messages(data)
    question_key = next((k for k in ("question", "问") if k in data), None)
    answer_key = next((k for k in ("answer", "答") if k in data), None)
    if question_key or answer_key:
        if not (question_key and answer_key):
            missing = "answer" if question_key else "question"
            raise ValueError(f"has '{question_key or answer_key}' but no '{missing}'.")
        messages = _system(data) + _history(data)
        messages += [
            {"role": "user", "content": _text(data[question_key], f"'{question_key}'")},
            {"role": "assistant", "content": _text(data[answer_key], f"'{answer_key}'")},
        ]
        return messages
    raise ValueError(
        "matches no known format. Expected 'conversations' (ShareGPT), 'messages' (OpenAI), "
        "'instruction' + 'output' (Alpaca) or 'question' + 'answer'; found keys: "
        f"{', '.join(map(repr, data)) or 'none'}."
    )


def _system(data: dict) -> list[dict]:
    system = data.get("system")
    if system is None or system == "":
        return []
    return [{"role": "system", "content": _text(system, "'system'")}]


def _history(data: dict) -> list[dict]:
    """Earlier turns of an Alpaca or question/answer record: 'history' as [question, answer] pairs."""
    history = data.get("history") or []
    if not isinstance(history, list):
        raise ValueError("'history' must be a list of [question, answer] pairs.")
    messages = []
    for index, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"history[{index}] must be a [question, answer] pair.")
        messages.append({"role": "user", "content": _text(pair[0], f"history[{index}] question")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history[{index}] answer")})
    return messages


def _alpaca_messages(data: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if key not in data:
            raise ValueError(f"Alpaca record has no '{key}'.")
    messages = _system(data) + _history(data)
    prompt = _text(data["instruction"], "'instruction'")
    extra = data.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError("'input' must be a string.")
    if extra.strip():
        prompt = f"{prompt}\n{extra}"
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(data["output"], "'output'")})
    return messages


def check_turn_order(messages: Sequence[dict], last_role: str = "assistant") -> None:
    """A system message only first, then user/assistant alternating from user, ending with ``last_role``."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("has no user or assistant turns.")
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            previous = turns[index - 1]["role"] if index else "the start"
            raise ValueError(
                f"roles out of order at turn {index + 1}: expected {expected} after {previous}, got "
                f"{message['role']}. Turns must alternate user, assistant, user, ... (a system turn only first)."
            )
    if turns[-1]["role"] != last_role:
        if last_role == "assistant":
            raise ValueError("the conversation has no assistant reply at the end; add the answer or drop the last question.")
        raise ValueError(f"the prompt must end with a {last_role} turn.")


def _answer(value, what: str) -> str:
    """A preference answer: a string, or TRL's conversational form [{"role": "assistant", "content": ...}]."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise ValueError(f"'{what}' as a list must hold one {{\"role\": \"assistant\", \"content\": ...}} message.")
        value = value[0].get("content")
    return _text(value, f"'{what}'")


def preference_from_record(data: dict) -> dict:
    """One preference pair as ``{"prompt": messages ending with a user turn, "chosen": str, "rejected": str}``.

    Formats: ``conversations``/``messages`` (the prompt turns) + ``chosen`` + ``rejected``;
    ``system`` + ``history`` + ``question`` + ``response_chosen`` + ``response_rejected``;
    TRL-style ``prompt`` + ``chosen`` + ``rejected`` (strings or message lists).
    """
    if "response_chosen" in data or "response_rejected" in data:
        missing = [k for k in ("question", "response_chosen", "response_rejected") if k not in data]
        if missing:
            raise ValueError(f"has response_chosen/response_rejected but no {', '.join(map(repr, missing))}.")
        history = _alpaca_messages({"system": data.get("system"), "history": data.get("history"),
                                    "instruction": data["question"], "output": "-"})[:-1]
        prompt, chosen, rejected = history, data["response_chosen"], data["response_rejected"]
        names = ("response_chosen", "response_rejected")
    elif "chosen" in data or "rejected" in data:
        missing = [k for k in ("chosen", "rejected") if k not in data]
        if missing:
            raise ValueError(f"has no {missing[0]!r} answer.")
        if "conversations" in data:
            prompt = _turns(data["conversations"], "conversations", "from", "value")
        elif "messages" in data:
            prompt = _turns(data["messages"], "messages", "role", "content")
        elif "prompt" in data:
            value = data["prompt"]
            prompt = _turns(value, "prompt", "role", "content") if isinstance(value, list) else \
                [{"role": "user", "content": _text(value, "'prompt'")}]
        else:
            raise ValueError("has chosen/rejected but no prompt: add 'conversations', 'messages' or 'prompt'.")
        chosen, rejected, names = data["chosen"], data["rejected"], ("chosen", "rejected")
    else:
        raise ValueError(
            "matches no preference format. Expected 'conversations' or 'messages' or 'prompt' with 'chosen' and "
            "'rejected', or 'question' with 'response_chosen' and 'response_rejected'; found keys: "
            f"{', '.join(map(repr, data)) or 'none'}."
        )
    check_turn_order(prompt, last_role="user")
    return {"prompt": prompt, "chosen": _answer(chosen, names[0]), "rejected": _answer(rejected, names[1])}


def build_preference_dataset(records, tokenizer, template, max_length: int | None, name: str = "train"):
    """Preference pairs as TRL's conversational prompt/chosen/rejected columns, with the skips reported.

    Pairs whose answers are identical teach nothing and pairs longer than ``max_length`` tokens
    would be silently dropped or cut by TRL; both are skipped here, counted and logged by source.
    """
    import datasets

    kept, identical, too_long = [], [], []
    for source, pair in records:
        if pair["chosen"].strip() == pair["rejected"].strip():
            identical.append(source)
            continue
        if max_length is not None:
            longest = max(
                len(tokenizer(template.render(pair["prompt"] + [{"role": "assistant", "content": pair[key]}]),
                              add_special_tokens=False)["input_ids"])
                for key in ("chosen", "rejected")
            )
            if longest > max_length:
                too_long.append(source)
                continue
        kept.append({
            "prompt": pair["prompt"],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
        })
    for sources, why in ((identical, "chosen and rejected are identical"),
                         (too_long, f"longer than max_length={max_length} tokens (raise --max_length)")):
        if sources:
            logger.warning("%s: skipped %d pair(s), %s: %s%s", name, len(sources), why, ", ".join(sources[:10]),
                           " ..." if len(sources) > 10 else "")
    if not kept:
        raise DataError([f"no usable {name} preference pairs remain after skipping the ones above"], what=f"{name} data")
    counts = {"kept": len(kept), "skipped_identical": len(identical), "skipped_too_long": len(too_long)}
    return datasets.Dataset.from_list(kept), counts


def load_preference_datasets(data_args, tokenizer, template, max_length: int | None, seed: int):
    """Training and validation preference datasets for RM and DPO, with their skip counts
    (``train_pairs_*``, ``eval_pairs_*``). The validation dataset is None when there is none."""
    train_records, eval_records = load_train_validation(data_args, json_reader(preference_from_record),
                                                        "preference data", seed)
    train, counts = build_preference_dataset(train_records, tokenizer, template, max_length, "train")
    metrics = {f"train_pairs_{key}": value for key, value in counts.items()}
    validation = None
    if eval_records:
        validation, counts = build_preference_dataset(eval_records, tokenizer, template, max_length, "validation")
        metrics.update({f"eval_pairs_{key}": value for key, value in counts.items()})
    return train, validation, metrics


def load_records(paths: Sequence[Path], convert: Callable[[dict], object]) -> list[tuple[str, object]]:
    """Read JSON files and convert every record; raise one DataError listing every problem."""
    problems: list[str] = []
    records = read_json_records(paths, problems)
    converted = []
    for record in records:
        try:
            converted.append((record.source, convert(record.data)))
        except ValueError as error:
            problems.append(f"{record.source}: {error}")
    if problems:
        raise DataError(problems)
    return converted


def json_reader(convert: Callable[[dict], object]) -> Callable[[Sequence[Path]], list]:
    """A reader for load_train_validation: JSON records converted by ``convert``."""
    return lambda paths: load_records(paths, convert)


def text_document_reader(paragraphs: bool = False) -> Callable[[Sequence[Path]], list]:
    """A reader of documents for pretraining: .txt files (one document per line, or per blank-line
    separated paragraph with ``paragraphs``) and .jsonl/.json records with a ``text`` field."""

    def read(paths: Sequence[Path]) -> list[tuple[str, str]]:
        problems: list[str] = []
        documents: list[tuple[str, str]] = []
        for path in paths:
            if path.suffix.lower() in (".jsonl", ".json"):
                for record in read_json_records([path], problems):
                    try:
                        documents.append((record.source, _text(record.data.get("text"), "'text'")))
                    except ValueError as error:
                        problems.append(f"{record.source}: {error} Each record needs a non-empty 'text' string.")
                continue
            documents += _text_documents([path], paragraphs, problems)
        if problems:
            raise DataError(problems)
        return documents

    return read


def _read_text_file(path: Path, paragraphs: bool, problems: list[str]) -> list[tuple[str, str]]:
    documents, current, start = [], [], 0
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            problems.append(f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                            f"{error.start + 1}). Re-save the file as UTF-8.")
            continue
        if not paragraphs:
            if line:
                documents.append((f"{path}:{number}", line))
        elif line:
            start = start or number
            current.append(line)
        elif current:
            documents.append((f"{path}:{start}", "\n".join(current)))
            current, start = [], 0
    if current:
        documents.append((f"{path}:{start}", "\n".join(current)))
    return documents


def conversation_from_record(data: dict) -> list[dict]:
    messages = record_to_messages(data)
    check_turn_order(messages, "assistant")
    return messages


def split_train_validation(items: list, percentage: float, seed: int) -> tuple[list, list]:
    """Hold out ``percentage`` percent (at least one record when percentage > 0), seeded."""
    if percentage <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    count = max(1, int(len(items) * percentage / 100))
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# ---------------------------------------------------------------- SFT tokenization


def tokenize_for_sft(template, tokenizer, messages: list[dict], max_length: int, overlong_policy: str) -> dict:
    """input_ids/labels for one conversation, cut at turn boundaries to ``max_length``.

    ``status`` says what happened: kept, cut (later turns dropped so every trained answer keeps its
    end-of-turn token), truncated (first answer cut, by --overlong_policy truncate) or skipped.
    """
    from template import encode_conversation

    input_ids, labels, turn_ends = encode_conversation(template, tokenizer, messages)
    status = "kept"
    if len(input_ids) > max_length:
        fitting = [end for end in turn_ends if end <= max_length]
        if fitting:
            input_ids, labels, status = input_ids[: fitting[-1]], labels[: fitting[-1]], "cut"
        elif overlong_policy == "truncate":
            input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
        else:
            input_ids, labels, status = [], [], "skipped"
    return {"input_ids": input_ids, "labels": labels, "status": status}


def build_sft_dataset(
    conversations: Sequence[tuple[str, list[dict]]],
    tokenizer,
    template,
    max_length: int,
    overlong_policy: str,
    num_proc: int | None = None,
    name: str = "train",
):
    """Tokenize conversations into a datasets.Dataset (input_ids, labels) and report what was cut."""
    import datasets

    sources = [source for source, _ in conversations]
    raw = datasets.Dataset.from_dict({"messages": [m for _, m in conversations]})
    tokenized = raw.map(
        lambda example: tokenize_for_sft(template, tokenizer, example["messages"], max_length, overlong_policy),
        remove_columns=["messages"],
        num_proc=num_proc,
        desc=f"Tokenizing {name} conversations",
    )
    statuses = tokenized["status"]
    counts = {status: statuses.count(status) for status in ("kept", "cut", "truncated", "skipped")}
    skipped_sources = [source for source, status in zip(sources, statuses) if status == "skipped"]
    if counts["cut"]:
        logger.warning(
            "%s: %d conversation(s) longer than max_length=%d were cut after their last whole assistant turn.",
            name, counts["cut"], max_length,
        )
    if counts["truncated"]:
        logger.warning(
            "%s: %d conversation(s) had a first exchange longer than max_length=%d and were truncated "
            "(--overlong_policy truncate); those answers lose their end-of-turn token.",
            name, counts["truncated"], max_length,
        )
    if skipped_sources:
        logger.warning(
            "%s: skipped %d conversation(s) whose first exchange is longer than max_length=%d "
            "(raise --max_length or pass --overlong_policy truncate): %s%s",
            name, len(skipped_sources), max_length, ", ".join(skipped_sources[:10]),
            " ..." if len(skipped_sources) > 10 else "",
        )
    kept = tokenized.filter(lambda example: example["status"] != "skipped", desc=f"Dropping skipped {name} records")
    if len(kept) == 0:
        raise DataError(
            [f"every {name} conversation is longer than --max_length {max_length} in its first exchange"],
            what=f"{name} data",
        )
    return kept.remove_columns(["status"]), counts


def load_train_validation(data_args, read: Callable[[Sequence[Path]], list], what: str, seed: int,
                          extensions: Sequence[str] = (".jsonl", ".json")):
    """Training and validation records per the data arguments, every problem of both reported at once.

    With no validation files, ``--validation_split_percentage`` of the training records is held out.
    ``read`` turns file paths into ``(source, item)`` pairs (see json_reader, text_document_reader).
    Returns ``(train, validation)`` lists of ``(source, item)``.
    """
    problems: list[str] = []
    splits = {}
    for flag, directory, files in (
        ("train", data_args.train_file_dir, data_args.train_files),
        ("validation", data_args.validation_file_dir, data_args.validation_files),
    ):
        if flag == "train" and not (directory or files):
            problems.append("no training data given: pass --train_file_dir DIR and/or --train_files FILE ...")
            continue
        if flag == "validation" and not (directory or files):
            splits[flag] = None
            continue
        try:
            paths = find_data_files(directory, files, extensions, flag)
            splits[flag] = read(paths)
        except DataError as error:
            problems += error.problems
    if problems:
        raise DataError(problems, what=what)
    train, validation = splits["train"], splits["validation"]
    if validation is None:
        train, validation = split_train_validation(train, data_args.validation_split_percentage, seed)
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        validation = validation[: data_args.max_eval_samples]
    logger.info("%s: %d training and %d validation records", what, len(train), len(validation))
    return train, validation


# ---------------------------------------------------------------- pretraining blocks


def deduplicate_documents(train: list, validation: list) -> tuple[list, list, dict]:
    """Drop exact duplicate documents (after trimming whitespace): repeats within the training set,
    and validation documents that also occur in training (they would leak). Counted, never silent."""
    seen: set[str] = set()
    kept_train = []
    for source, text in train:
        key = text.strip()
        if key not in seen:
            seen.add(key)
            kept_train.append((source, text))
    kept_validation, validation_seen = [], set()
    for source, text in validation:
        key = text.strip()
        if key not in seen and key not in validation_seen:
            validation_seen.add(key)
            kept_validation.append((source, text))
    counts = {"train_duplicates_removed": len(train) - len(kept_train),
              "validation_duplicates_removed": len(validation) - len(kept_validation)}
    if any(counts.values()):
        logger.warning("Removed exact duplicate documents: %d from training, %d from validation "
                       "(repeats, or also present in training).", *counts.values())
    return kept_train, kept_validation, counts


def build_pretraining_blocks(documents: Sequence[tuple[str, str]], tokenizer, block_size: int,
                             num_proc: int | None = None, name: str = "train"):
    """Tokenize documents, end each with EOS, concatenate, and cut into blocks of ``block_size``.

    The standard continued-pretraining recipe: every block is exactly ``block_size`` tokens and
    documents inside it are separated by EOS. The tail shorter than one block is dropped and
    reported. Returns the blocks dataset (``input_ids``) and counts.
    """
    import datasets
    import numpy as np

    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token to separate documents; set one on the tokenizer.")
    raw = datasets.Dataset.from_dict({"text": [text for _, text in documents]})
    eos = tokenizer.eos_token_id
    tokenized = raw.map(
        lambda batch: {"ids": [ids + [eos] for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]},
        batched=True, remove_columns=["text"], num_proc=num_proc, desc=f"Tokenizing {name} documents",
    )
    stream = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in tokenized["ids"]])
    blocks = len(stream) // block_size
    if blocks == 0:
        raise DataError([f"the {name} text has {len(stream)} tokens, fewer than one block of --block_size "
                         f"{block_size}; add text or lower --block_size"], what=f"{name} text")
    counts = {"documents": len(documents), "tokens": int(len(stream)), "blocks": blocks,
              "tail_tokens_dropped": int(len(stream) - blocks * block_size)}
    logger.info("%s: %d documents, %d tokens -> %d blocks of %d (last %d tokens, less than a block, dropped)",
                name, counts["documents"], counts["tokens"], blocks, block_size, counts["tail_tokens_dropped"])
    data = stream[: blocks * block_size].reshape(blocks, block_size)
    return datasets.Dataset.from_dict({"input_ids": data.tolist()}), counts


# ---------------------------------------------------------------- questions with verifiable answers (GRPO, evaluation)

_CJK = re.compile(r"[\u4e00-\u9fff]")
ANSWER_INSTRUCTIONS = {
    ("en", "choice"): 'Think it through briefly, then give the final answer on the last line as "Answer: <option letter(s)>".',
    ("en", "open"): 'Think it through briefly, then give the final answer on the last line as "Answer: <short answer>".',
    ("zh", "choice"): "请先简要分析，最后单独一行写“答案：<选项字母>”。",
    ("zh", "open"): "请先简要分析，最后单独一行写“答案：<简短答案>”。",
}


def question_from_record(data: dict) -> dict:
    """A question with a checkable answer: ``{"prompt": messages, "answer": str, "kind": "choice"|"open"}``.

    Records: ``question`` + ``answer`` (a letter when the options are written in the question, else
    free text), optionally ``options`` ({"A": ..., "B": ...} or a list, rendered into the prompt)
    and ``system``. The prompt asks for brief reasoning and a final "Answer:"/"答案：" line.
    """
    for key in ("question", "answer"):
        if key not in data:
            raise ValueError(f"has no '{key}'. Expected 'question', 'answer' and optionally 'options'.")
    question = _text(data["question"], "'question'")
    answer = _text(data["answer"], "'answer'").strip()
    options = data.get("options")
    if isinstance(options, list):
        options = dict(zip("ABCDEFGH", options))
    if options is not None:
        if not isinstance(options, dict) or not options:
            raise ValueError("'options' must be an object like {\"A\": \"...\", \"B\": \"...\"} or a list.")
        keys = "".join(sorted(str(k).strip().upper() for k in options))
        if not re.fullmatch(r"[A-H]+", keys):
            raise ValueError(f"option keys must be letters A-H, got {', '.join(map(str, options))}.")
        letters = answer.upper().replace(",", "").replace(" ", "")
        if not letters or any(c not in keys for c in letters):
            raise ValueError(f"answer {answer!r} is not one of the option letters {', '.join(keys)}.")
        answer = "".join(sorted(set(letters)))
        question += "\n" + "\n".join(f"{str(k).strip().upper()}. {_text(v, f'option {k}')}" for k, v in sorted(options.items()))
    kind = "choice" if re.fullmatch(r"[A-Ha-h]+", answer) and (options is not None or len(answer) <= 3) else "open"
    language = "zh" if _CJK.search(question) else "en"
    prompt = _system(data) + [{"role": "user", "content": f"{question}\n\n{ANSWER_INSTRUCTIONS[language, kind]}"}]
    return {"prompt": prompt, "answer": answer.upper() if kind == "choice" else answer, "kind": kind}


def qa_item_from_record(data: dict) -> dict:
    """The prompt turns of any record, with its reference answer when it has one:
    ``{"messages": [... ending with a user turn], "reference": str (optional)}``.

    Records: an SFT conversation (the last answer becomes the reference), a preference pair (its
    prompt; `chosen` is the reference), a question with or without an answer, or {"prompt": "..."}.
    """
    if any(key in data for key in ("chosen", "rejected", "response_chosen", "response_rejected")):
        pair = preference_from_record(data)
        return {"messages": pair["prompt"], "reference": pair["chosen"]}
    item = {}
    if "prompt" in data:
        value = data["prompt"]
        messages = _turns(value, "prompt", "role", "content") if isinstance(value, list) else \
            [{"role": "user", "content": _text(value, "'prompt'")}]
    elif "question" in data and "answer" not in data:
        messages = _system(data) + [{"role": "user", "content": _text(data["question"], "'question'")}]
    else:
        messages = record_to_messages(data)
        if messages[-1]["role"] == "assistant":
            item["reference"] = messages[-1]["content"]
            messages = messages[:-1]
    check_turn_order(messages, last_role="user")
    return {"messages": messages, **item}


def qa_reader(paths: Sequence[Path]) -> list[tuple[str, dict]]:
    """A reader for load_train_validation: prompts (and references) from .txt lines and records of any format."""
    problems: list[str] = []
    items = [(source, {"messages": [{"role": "user", "content": line}]})
             for source, line in _text_documents([p for p in paths if p.suffix.lower() == ".txt"], False, problems)]
    try:
        items += load_records([p for p in paths if p.suffix.lower() != ".txt"], qa_item_from_record)
    except DataError as error:
        problems += error.problems
    if problems:
        raise DataError(problems)
    return items


def _text_documents(paths: Sequence[Path], paragraphs: bool, problems: list[str]) -> list[tuple[str, str]]:
    """Documents of .txt files (lines, or paragraphs); an empty file is a problem."""
    documents = []
    for path in paths:
        found = _read_text_file(path, paragraphs, problems)
        if not found and not any(p.startswith(f"{path}:") for p in problems):
            problems.append(f"{path}: the file is empty.")
        documents += found
    return documents
