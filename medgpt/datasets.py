"""Find data files, read and validate records, convert the formats users bring, tokenize.

Every problem in the input is collected and reported at once, each naming the file and line
and what to fix, before any training starts. Nothing is dropped silently: records skipped on
purpose are counted and reported.

Conversation formats, detected per record:

- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system"|"user"|"assistant", "value": ...}]}``
- OpenAI:   ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``
- Alpaca:   ``{"instruction", "input"?, "output", "system"?, "history"?: [[question, answer], ...]}``
- Q/A:      ``{"question", "answer"}`` (also ``{"问", "答"}``), with an optional ``system``

Reasoning: an assistant turn's ``reasoning_content`` (also ``reasoning``/``thinking``), or a leading
``<think>...</think>`` in its text. Tool calls: ShareGPT turns ``function_call`` (value: JSON
``{"name", "arguments"}``) and ``observation`` (the tool's result); OpenAI assistant ``tool_calls`` and
``{"role": "tool"}`` messages; the record's ``tools`` (a list of function schemas, or a JSON string of one).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from medgpt.tool_calls import normalize_call, normalize_tools

logger = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 100

_ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "function_call",  # ShareGPT: the assistant calls a tool
    "observation": "tool",  # ShareGPT: the tool's result
    "tool": "tool",
    "function": "tool",  # OpenAI's older name of the tool role
}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


class Problem(str):
    """One problem in the user's data ("file:line: what is wrong"), with where it is and the raw record,
    so that --on_invalid_record skip can write the dropped record out."""

    def __new__(cls, text: str, source: str | None = None, raw=None):
        problem = super().__new__(cls, text)
        problem.source, problem.raw = source, raw
        return problem


class Conversation(list):
    """A conversation's messages, with the tools (function schemas) it may call (None: no tools)."""

    def __init__(self, messages=(), tools: list | None = None):
        super().__init__(messages)
        self.tools = tools or None


class DataError(ValueError):
    """Problems found in the user's data, all of them, one per line."""

    def __init__(self, problems: Sequence[str], what: str = "data", kept: list | None = None):
        self.problems = list(problems)
        self.kept = kept  # the good records, when every problem is one record's (--on_invalid_record skip)
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
                problems.append(Problem(
                    f"{where}: not UTF-8 text (byte 0x{line[error.start]:02x} at column {error.start + 1}). "
                    "Re-save the file as UTF-8.", where, line.decode("utf-8", "replace")))
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                problems.append(Problem(f"{where}: not valid JSON ({error.msg} at column {error.colno}).", where, text))
                continue
            if not isinstance(value, dict):
                problems.append(Problem(f"{where}: expected a JSON object {{...}}, got {type(value).__name__}.",
                                        where, value))
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
            problems.append(Problem(f"{where}: expected a JSON object {{...}}, got {type(value).__name__}.", where, value))
    return out


# ---------------------------------------------------------------- conversations


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise ValueError(f"{what} is empty.")
    return value


def _turns(items, key: str, role_key: str, content_key: str, tools: list | None = None) -> list[dict]:
    """A record's turns as messages; ShareGPT function_call/observation turns and OpenAI tool_calls/tool
    messages become assistant tool calls and tool results; reasoning is read off assistant turns."""
    if not isinstance(items, list) or not items:
        raise ValueError(f"'{key}' must be a non-empty list of turns.")
    declared = [tool["function"]["name"] for tool in tools] if tools else []
    messages: list[dict] = []
    for index, turn in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} must be an object with '{role_key}' and '{content_key}'.")
        role = turn.get(role_key, turn.get("role", turn.get("from")))
        content = turn.get(content_key, turn.get("content", turn.get("value")))
        if role not in _ROLE_NAMES:
            raise ValueError(
                f"{where} has unknown role {role!r}; use one of system, human or user, gpt or assistant, "
                "function_call, observation or tool."
            )
        role = _ROLE_NAMES[role]
        if role == "function_call":
            calls = content if isinstance(content, list) else [content]
            calls = [normalize_call(call, f"{where} (function_call)", declared) for call in calls]
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "assistant" and not previous.get("tool_calls"):
                previous["tool_calls"] = calls  # a gpt turn's text, then its call
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif role == "tool":
            if isinstance(content, (dict, list)):
                content = json.dumps(content, ensure_ascii=False)
            message = {"role": "tool", "content": _text(content, f"{where} (tool result) text")}
            if isinstance(turn.get("name"), str):
                message["name"] = turn["name"]
            messages.append(message)
        elif role == "assistant":
            messages.append(_assistant_message(turn, content, where, declared))
        else:
            messages.append({"role": role, "content": _text(content, f"{where} text")})
    return messages


def _assistant_message(turn: dict, content, where: str, declared: list[str]) -> dict:
    """An assistant turn: its text, its reasoning (a field or a leading <think> block) and its tool calls."""
    from template import split_reasoning

    calls = turn.get("tool_calls") if isinstance(turn, dict) else None
    if calls is not None and not isinstance(calls, list):
        raise ValueError(f"{where}: 'tool_calls' must be a list of calls.")
    calls = [normalize_call(call, f"{where}.tool_calls[{i}]", declared) for i, call in enumerate(calls or [])]
    reasoning = next((turn[k] for k in REASONING_KEYS if isinstance(turn, dict) and turn.get(k) is not None), None)
    if reasoning is not None and not isinstance(reasoning, str):
        raise ValueError(f"{where}: the reasoning must be a string.")
    if calls and content in (None, ""):
        content = ""
    else:
        content = _text(content, f"{where} text")
    if reasoning is None:
        found, answer = split_reasoning(content)
        if found is not None:
            reasoning, content = found, answer
    if not content.strip() and not calls:
        raise ValueError(f"{where} has reasoning but no answer after it.")
    message = {"role": "assistant", "content": content}
    if reasoning is not None and reasoning.strip():
        message["reasoning_content"] = reasoning.strip()
    if calls:
        message["tool_calls"] = calls
    return message


def record_tools(data: dict) -> list[dict] | None:
    """The record's ``tools`` (function schemas), or None when it has none."""
    value = data.get("tools")
    if value is None or value == "" or value == []:
        return None
    return normalize_tools(value)


def record_to_messages(data: dict) -> Conversation:
    """Convert one record of any supported format to OpenAI-style messages (not yet order-checked)."""
    formats = [key for key in ("conversations", "messages", "instruction") if key in data]
    if len(formats) > 1:
        raise ValueError(f"has both {' and '.join(map(repr, formats))}; one record holds one format.")
    if "conversations" in data or "messages" in data:
        tools = record_tools(data)
        turns = (_turns(data["conversations"], "conversations", "from", "value", tools) if "conversations" in data
                 else _turns(data["messages"], "messages", "role", "content", tools))
        system = _system(data)  # a top-level system prompt (LLaMA-Factory's ShareGPT layout)
        if system and turns and turns[0]["role"] == "system":
            raise ValueError("has a top-level 'system' and a system turn; keep one of them.")
        return Conversation(system + turns, tools)
    if "instruction" in data or "output" in data:
        return Conversation(_alpaca_messages(data))
    question_key = next((k for k in ("question", "问") if k in data), None)
    answer_key = next((k for k in ("answer", "答") if k in data), None)
    if question_key or answer_key:
        if not (question_key and answer_key):
            missing = "answer" if question_key else "question"
            raise ValueError(f"has '{question_key or answer_key}' but no '{missing}'.")
        messages = _system(data) + _history(data)
        messages += [
            {"role": "user", "content": _text(data[question_key], f"'{question_key}'")},
            _assistant_message({}, data[answer_key], f"'{answer_key}'", []),
        ]
        return Conversation(messages)
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
    messages.append(_assistant_message({}, data["output"], "'output'", []))
    return messages


def check_turn_order(messages: Sequence[dict], last_role: str = "assistant") -> None:
    """A system message only first, then user and assistant turns alternating from user. An assistant turn
    that calls tools is followed by one tool result per call, then the assistant continues. The conversation
    ends with ``last_role`` ("user" for a prompt, where ending on tool results is also a prompt)."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("has no user or assistant turns.")
    expected, pending = "user", 0
    for index, message in enumerate(turns):
        role = message["role"]
        previous = turns[index - 1]["role"] if index else "the start"
        if pending:
            if role != "tool":
                raise ValueError(f"turn {index + 1}: a tool call needs its result (an observation/tool turn) next, "
                                 f"got {role}. Add the tool's result after each call.")
            pending -= 1
            expected = "tool" if pending else "assistant"
            continue
        if role != expected:
            want = "a tool result" if expected == "tool" else expected
            raise ValueError(
                f"roles out of order at turn {index + 1}: expected {want} after {previous}, got "
                f"{role}. Turns must alternate user, assistant, user, ... (a system turn only first; a tool "
                "result only right after the call)."
            )
        if role == "assistant" and message.get("tool_calls"):
            pending = len(message["tool_calls"])
            expected = "tool"
        else:
            expected = "assistant" if role == "user" else "user"
    last = turns[-1]
    if last_role == "assistant":  # it may end on a call (training to call), not on a result
        if last["role"] == "tool":
            raise ValueError("the conversation ends with a tool result, not with the assistant's answer; add the "
                             "answer or drop the last turns.")
        if last["role"] != "assistant":
            raise ValueError("the conversation has no assistant reply at the end; add the answer or drop the last question.")
    elif last["role"] not in (last_role, "tool") or pending:
        raise ValueError(f"the prompt must end with a {last_role} turn.")


def _answer(value, what: str, declared: list[str]) -> dict:
    """A preference answer as an assistant message: a string; TRL's [{"role": "assistant", ...}]; one ShareGPT
    turn {"from": "gpt"|"function_call", "value": ...}; or one OpenAI assistant message (with tool_calls)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise ValueError(f"'{what}' as a list must hold one {{\"role\": \"assistant\", \"content\": ...}} message.")
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from"))
        if role == "function_call":
            return _turns([value], what, "from", "value", [{"function": {"name": n}} for n in declared] or None)[0]
        if role not in ("assistant", "gpt"):
            raise ValueError(f"'{what}' must be the assistant's turn (gpt, assistant or function_call), got {role!r}.")
        return _assistant_message(value, value.get("content", value.get("value")), f"'{what}'", declared)
    return _assistant_message({}, value, f"'{what}'", declared)


def preference_from_record(data: dict) -> dict:
    """One preference pair as ``{"prompt": messages ending with a user (or tool) turn, "chosen": assistant message,
    "rejected": assistant message}``, plus ``"tools"`` when the record declares tools.

    Formats: ``conversations``/``messages`` (the prompt turns) + ``chosen`` + ``rejected``;
    ``system`` + ``history`` + ``question`` + ``response_chosen`` + ``response_rejected``;
    TRL-style ``prompt`` + ``chosen`` + ``rejected`` (strings or message lists). An answer may be a tool call.
    """
    tools = record_tools(data)
    declared = [tool["function"]["name"] for tool in tools] if tools else []
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
            prompt = _turns(data["conversations"], "conversations", "from", "value", tools)
        elif "messages" in data:
            prompt = _turns(data["messages"], "messages", "role", "content", tools)
        elif "prompt" in data:
            value = data["prompt"]
            prompt = _turns(value, "prompt", "role", "content", tools) if isinstance(value, list) else \
                [{"role": "user", "content": _text(value, "'prompt'")}]
        else:
            raise ValueError("has chosen/rejected but no prompt: add 'conversations', 'messages' or 'prompt'.")
        system = _system(data)
        if system and prompt and prompt[0]["role"] == "system":
            raise ValueError("has a top-level 'system' and a system turn; keep one of them.")
        prompt = system + prompt
        chosen, rejected, names = data["chosen"], data["rejected"], ("chosen", "rejected")
    else:
        raise ValueError(
            "matches no preference format. Expected 'conversations' or 'messages' or 'prompt' with 'chosen' and "
            "'rejected', or 'question' with 'response_chosen' and 'response_rejected'; found keys: "
            f"{', '.join(map(repr, data)) or 'none'}."
        )
    check_turn_order(prompt, last_role="user")
    pair = {"prompt": prompt, "chosen": _answer(chosen, names[0], declared),
            "rejected": _answer(rejected, names[1], declared)}
    return {**pair, "tools": tools} if tools else pair


def _same_answer(a: dict, b: dict) -> bool:
    return (a["content"].strip() == b["content"].strip() and a.get("tool_calls") == b.get("tool_calls")
            and (a.get("reasoning_content") or "") == (b.get("reasoning_content") or ""))


def tokenize_pair(template, tokenizer, pair: dict) -> dict:
    """A preference pair as token ids: the prompt (rendered with its generation prompt), and each answer
    through its end-of-turn marker, located by the template as SFT locates answers; also as text."""
    out = {}
    for key in ("chosen", "rejected"):
        text, spans = template.answer_spans(pair["prompt"] + [pair[key]], pair.get("tools"))
        start, end, _ = spans[-1]
        encoding = tokenizer(text[:end], add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        split = next((i for i, (first, _) in enumerate(encoding["offset_mapping"]) if first >= start), len(ids))
        out.setdefault("prompt_ids", ids[:split])
        out.setdefault("prompt", text[:start])
        out[f"{key}_ids"], out[key] = ids[split:], text[start:end]
    return out


def build_preference_dataset(records, tokenizer, template, max_length: int | None, name: str = "train",
                             invalid: "InvalidRecords | None" = None, num_proc: int | None = None, kind: str = "dpo"):
    """Preference pairs tokenized by the stage's template. ``kind``: ``dpo`` gives ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids`` (the answers' own tokens, as DPOTrainer takes them); ``reward`` gives whole sequences
    ``chosen_ids``/``rejected_ids`` (RewardTrainer); ``text`` the rendered ``prompt``/``chosen``/``rejected``
    strings (for trainers that tokenize text themselves). Skips are reported and counted.

    Pairs whose answers are identical teach nothing and pairs longer than ``max_length`` tokens
    would be silently dropped or cut by TRL; both are skipped here, counted and logged by source.
    Pairs the template cannot render are invalid records (see InvalidRecords).
    """
    import datasets

    invalid = invalid or InvalidRecords()
    identical = [source for source, pair in records if _same_answer(pair["chosen"], pair["rejected"])]
    usable = [(source, pair) for source, pair in records if source not in set(identical)]

    def tokenize(example):
        try:
            tokens = tokenize_pair(template, tokenizer, json.loads(example["pair"]))
        except ValueError as error:
            return {"problem": str(error), "prompt_ids": [], "chosen_ids": [], "rejected_ids": [],
                    "prompt": "", "chosen": "", "rejected": ""}
        return {"problem": "", **tokens}

    raw = datasets.Dataset.from_dict({"source": [s for s, _ in usable],
                                      "pair": [json.dumps(p, ensure_ascii=False) for _, p in usable]})
    tokenized = raw.map(tokenize, num_proc=num_proc, desc=f"Tokenizing {name} preference pairs")
    for source, problem, pair in zip(tokenized["source"], tokenized["problem"], tokenized["pair"]):
        if problem:
            invalid.add(Problem(f"{source}: {problem}", source, json.loads(pair)))
    bad = {source for source, problem in zip(tokenized["source"], tokenized["problem"]) if problem}
    lengths = [max(len(p) + len(c), len(p) + len(r)) for p, c, r in
               zip(tokenized["prompt_ids"], tokenized["chosen_ids"], tokenized["rejected_ids"])]
    too_long = [source for source, length in zip(tokenized["source"], lengths)
                if max_length is not None and source not in bad and length > max_length]
    for sources, why in ((identical, "chosen and rejected are identical"),
                         (too_long, f"longer than max_length={max_length} tokens (raise --max_length)")):
        if sources:
            logger.warning("%s: skipped %d pair(s), %s: %s%s", name, len(sources), why, ", ".join(sources[:10]),
                           " ..." if len(sources) > 10 else "")
    drop = bad | set(too_long)
    kept = tokenized.filter(lambda example: example["source"] not in drop, desc=f"Dropping skipped {name} pairs")
    if len(kept) == 0:
        invalid.raise_now()
        raise DataError([f"no usable {name} preference pairs remain after skipping the ones above"], what=f"{name} data")
    if kind == "reward":
        kept = kept.map(lambda x: {"chosen_ids": x["prompt_ids"] + x["chosen_ids"],
                                   "rejected_ids": x["prompt_ids"] + x["rejected_ids"]}, desc="Joining prompts")
    columns = {"text": ["prompt", "chosen", "rejected"], "reward": ["chosen_ids", "rejected_ids"]}.get(
        kind, ["prompt_ids", "chosen_ids", "rejected_ids"])
    kept = kept.select_columns(columns)
    counts = {"kept": len(kept), "skipped_identical": len(identical), "skipped_too_long": len(too_long)}
    return kept, counts


def load_preference_datasets(data_args, tokenizer, template, max_length: int | None, seed: int,
                             invalid: "InvalidRecords | None" = None, kind: str = "dpo"):
    """Training and validation preference datasets for RM and DPO, with their skip counts
    (``train_pairs_*``, ``eval_pairs_*``). The validation dataset is None when there is none."""
    invalid = invalid or InvalidRecords()
    train_records, eval_records = load_train_validation(data_args, json_reader(preference_from_record),
                                                        "preference data", seed, invalid=invalid)
    kwargs = dict(invalid=invalid, num_proc=data_args.preprocessing_num_workers, kind=kind)
    train, counts = build_preference_dataset(train_records, tokenizer, template, max_length, "train", **kwargs)
    metrics = {f"train_pairs_{key}": value for key, value in counts.items()}
    validation = None
    if eval_records:
        validation, counts = build_preference_dataset(eval_records, tokenizer, template, max_length, "validation",
                                                      **kwargs)
        metrics.update({f"eval_pairs_{key}": value for key, value in counts.items()})
    metrics.update(invalid.finish("preference data"))
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
            problems.append(Problem(f"{record.source}: {error}", record.source, record.data))
    if problems:
        raise DataError(problems, kept=converted)
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
                        problems.append(Problem(f"{record.source}: {error} Each record needs a non-empty 'text' "
                                                "string.", record.source, record.data))
                continue
            documents += _text_documents([path], paragraphs, problems)
        if problems:
            raise DataError(problems, kept=documents)
        return documents

    return read


def _read_text_file(path: Path, paragraphs: bool, problems: list[str]) -> list[tuple[str, str]]:
    documents, current, start = [], [], 0
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            problems.append(Problem(f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                    f"{error.start + 1}). Re-save the file as UTF-8.", f"{path}:{number}",
                                    raw.decode("utf-8", "replace")))
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


def conversation_from_record(data: dict) -> Conversation:
    """An SFT conversation (messages with .tools), checked: turns in order, ending with the assistant."""
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


def tokenize_for_sft(template, tokenizer, messages: list[dict], max_length: int, overlong_policy: str,
                     tools: list | None = None, train_on_reasoning: bool = True) -> dict:
    """input_ids/labels for one conversation, cut at turn boundaries to ``max_length``.

    ``status`` says what happened: kept, cut (later turns dropped so every trained answer keeps its
    end-of-turn token), truncated (first answer cut, by --overlong_policy truncate) or skipped.
    """
    from template import encode_conversation

    input_ids, labels, turn_ends = encode_conversation(template, tokenizer, messages, tools, train_on_reasoning)
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
    invalid: InvalidRecords | None = None,
    train_on_reasoning: bool = True,
):
    """Tokenize conversations into a datasets.Dataset (input_ids, labels) and report what was cut.

    A conversation the template cannot render is an invalid record (see InvalidRecords)."""
    import datasets

    invalid = invalid or InvalidRecords()

    def tokenize(example):
        conversation = json.loads(example["conversation"])
        try:
            return {"problem": "", **tokenize_for_sft(template, tokenizer, conversation["messages"], max_length,
                                                      overlong_policy, conversation["tools"], train_on_reasoning)}
        except ValueError as error:
            return {"problem": str(error), "input_ids": [], "labels": [], "status": "invalid"}

    raw = datasets.Dataset.from_dict({
        "source": [source for source, _ in conversations],
        "conversation": [json.dumps({"messages": list(m), "tools": getattr(m, "tools", None)}, ensure_ascii=False)
                         for _, m in conversations],
    })
    tokenized = raw.map(tokenize, remove_columns=["conversation"], num_proc=num_proc,
                        desc=f"Tokenizing {name} conversations")
    statuses = tokenized["status"]
    for source, status, problem, (_, messages) in zip(tokenized["source"], statuses, tokenized["problem"], conversations):
        if status == "invalid":
            invalid.add(Problem(f"{source}: {problem}", source, {"messages": list(messages),
                                                                 "tools": getattr(messages, "tools", None)}))
    counts = {status: statuses.count(status) for status in ("kept", "cut", "truncated", "skipped", "invalid")}
    skipped_sources = [source for source, status in zip(tokenized["source"], statuses) if status == "skipped"]
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
    invalid.raise_now()
    kept = tokenized.filter(lambda example: example["status"] not in ("skipped", "invalid"),
                            desc=f"Dropping skipped {name} records")
    if len(kept) == 0:
        raise DataError(
            [f"no {name} conversation is usable: each is invalid or longer than --max_length {max_length} in its "
             "first exchange"],
            what=f"{name} data",
        )
    return kept.remove_columns(["status", "problem", "source"]), counts


INVALID_RECORDS_FILE = "invalid_records.jsonl"


class InvalidRecords:
    """--on_invalid_record: ``error`` stops at any invalid record (every one listed with its file and line);
    ``skip`` sets them aside, writes each with its file:line and the reason to ``invalid_records.jsonl`` in
    the output folder, and stops only when more than ``max_fraction`` of the records are invalid."""

    def __init__(self, policy: str = "error", max_fraction: float = 0.05, output_dir: str | None = None):
        self.policy, self.max_fraction, self.output_dir = policy, max_fraction, output_dir
        self.dropped: list[Problem] = []
        self.total = 0  # records read, valid or not

    @classmethod
    def from_args(cls, data_args, output_dir: str | None) -> "InvalidRecords":
        return cls(data_args.on_invalid_record, data_args.max_invalid_fraction, output_dir)

    def read(self, read: Callable[[Sequence[Path]], list], paths: Sequence[Path]) -> list:
        """``read(paths)``; under ``skip`` a DataError whose problems are all single records gives the good
        ones, and the problems are set aside."""
        try:
            records = read(paths)
        except DataError as error:
            single = error.kept is not None and all(getattr(p, "source", None) for p in error.problems)
            if self.policy != "skip" or not single:
                raise
            self.dropped += error.problems
            self.total += len(error.kept) + len(error.problems)
            return error.kept
        self.total += len(records)
        return records

    def add(self, problem: Problem) -> None:
        """A record found invalid after reading (e.g. its template cannot render it)."""
        self.dropped.append(problem)

    def raise_now(self) -> None:
        if self.dropped and self.policy != "skip":
            raise DataError(self.dropped)

    def finish(self, what: str) -> dict:
        """Stop (error policy, or too many invalid), else write the dropped records; metrics to report."""
        self.raise_now()
        count = len(self.dropped)
        if not count:
            return {"invalid_records": 0}
        self.dropped.sort(key=_source_order)
        path = Path(self.output_dir or ".", INVALID_RECORDS_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as sink:
            for problem in self.dropped:
                reason = str(problem)[len(problem.source) + 2:] if str(problem).startswith(problem.source) else str(problem)
                sink.write(json.dumps({"source": problem.source, "reason": reason, "record": problem.raw},
                                      ensure_ascii=False, default=str) + "\n")
        fraction = count / max(self.total, 1)
        if fraction > self.max_fraction:
            raise DataError([f"{count} of {self.total} records ({fraction:.1%}) are invalid, more than "
                             f"--max_invalid_fraction {self.max_fraction}; each is listed with its file:line and "
                             f"reason in {path}. Fix the data, or raise --max_invalid_fraction."], what=what)
        logger.warning("%s: skipped %d invalid record(s) of %d (--on_invalid_record skip); each is in %s with its "
                       "file:line and reason. First: %s", what, count, self.total, path, self.dropped[0])
        return {"invalid_records": count}


def _source_order(problem: Problem):
    """File, then line (or array index), as numbers: the order of the records in the user's files."""
    match = re.fullmatch(r"(.*?)(?::(\d+)|\[(\d+)\])", problem.source)
    return (match.group(1), int(match.group(2) or match.group(3))) if match else (problem.source, 0)


def load_train_validation(data_args, read: Callable[[Sequence[Path]], list], what: str, seed: int,
                          extensions: Sequence[str] = (".jsonl", ".json"), invalid: InvalidRecords | None = None):
    """Training and validation records per the data arguments, every problem of both reported at once.

    With no validation files, ``--validation_split_percentage`` of the training records is held out.
    ``read`` turns file paths into ``(source, item)`` pairs (see json_reader, text_document_reader).
    Invalid records stop the run unless ``invalid`` (an InvalidRecords with policy skip) sets them aside;
    the caller then calls ``invalid.finish()`` once its own checks are done.
    Returns ``(train, validation)`` lists of ``(source, item)``.
    """
    invalid = invalid or InvalidRecords()
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
            splits[flag] = invalid.read(read, paths)
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
        tools = {"tools": pair["tools"]} if pair.get("tools") else {}
        return {"messages": pair["prompt"], "reference": pair["chosen"]["content"], **tools}
    item = {}
    if "prompt" in data:
        value = data["prompt"]
        messages = _turns(value, "prompt", "role", "content") if isinstance(value, list) else \
            [{"role": "user", "content": _text(value, "'prompt'")}]
    elif "question" in data and "answer" not in data:
        messages = _system(data) + [{"role": "user", "content": _text(data["question"], "'question'")}]
    else:
        messages = record_to_messages(data)
        if messages.tools:
            item["tools"] = messages.tools
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
        items += error.kept or []
    if problems:
        raise DataError(problems, kept=items)
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
