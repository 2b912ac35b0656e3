"""What a record means: the formats users bring, converted to messages and checked.

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
import re
from dataclasses import dataclass
from typing import Callable, Sequence

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

    def __init__(self, problems: Sequence[str], what: str = "data", kept: list | None = None,
                 outcome: str = "nothing was trained"):
        self.problems = list(problems)
        self.kept = kept  # the good records, when every problem is one record's (--on_invalid_record skip)
        shown = self.problems[:MAX_REPORTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        text = f"Found {len(self.problems)} problem(s) in the {what}; {outcome}. Fix these and rerun:\n"
        text += "\n".join(f"  - {p}" for p in shown)
        if more:
            text += f"\n  ... and {more} more of the same kinds (the first {len(shown)} are shown)."
        super().__init__(text)


@dataclass
class Record:
    """One JSON object from a data file, with where it came from."""

    source: str  # "path:line" (or "path[index]" inside a JSON array)
    data: dict


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
    from medgpt.chat_template import split_reasoning

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


def check_turn_order(messages: Sequence[dict], last_role: str = "assistant",
                     where: Callable[[int], str] | None = None) -> None:
    """A system message only first, then user and assistant turns alternating from user. An assistant turn
    that calls tools is followed by one tool result per call, then the assistant continues. The conversation
    ends with ``last_role`` ("user" for a prompt, where ending on tool results is also a prompt).
    ``where(i)`` names ``messages[i]`` in the errors (default "turn N", counted after the system message)."""
    offset = 1 if messages and messages[0]["role"] == "system" else 0
    where = where or (lambda position: f"turn {position + 1 - offset}")
    turns = messages[offset:]
    if not turns:
        raise ValueError("has no user or assistant turns.")
    expected, pending = "user", 0
    for index, message in enumerate(turns):
        role = message["role"]
        previous = messages[offset + index - 1]["role"] if offset + index else "the start"
        if pending:
            if role != "tool":
                raise ValueError(f"{where(offset + index)}: a tool call needs its result (an observation/tool turn) "
                                 f"next, got {role}. Add the tool's result after each call.")
            pending -= 1
            expected = "tool" if pending else "assistant"
            continue
        if role != expected:
            want = "a tool result" if expected == "tool" else expected
            raise ValueError(
                f"roles out of order at {where(offset + index)}: expected {want} after {previous}, got "
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
        raise ValueError(f"the prompt must end with a {last_role} turn or tool results, not with {last['role']} "
                         f"({where(len(messages) - 1)}).")


def conversation_from_record(data: dict) -> Conversation:
    """An SFT conversation (messages with .tools), checked: turns in order, ending with the assistant."""
    messages = record_to_messages(data)
    check_turn_order(messages, "assistant")
    return messages


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

