"""Tool calls: read and check them in records, write them as text for templates without tool support,
and read them back out of generated text.

Inside MedGPT a conversation with tools uses OpenAI's shapes: a list of function schemas
(``{"type": "function", "function": {"name", "description", "parameters"}}``), assistant messages with
``tool_calls`` (``[{"type": "function", "function": {"name": str, "arguments": dict}}]``) and
``{"role": "tool", "content": str}`` messages holding the results.

A chat template that renders tools itself (Qwen2.5/3, Llama 3.1, GLM-4, gpt-oss...) gets them as they are.
Any other template gets the conversation written out in plain turns by :func:`to_plain_messages` in one
of the text formats of :data:`TOOL_FORMATS` (``--tool_format``): the tool list joins the system prompt,
calls become the assistant's text, results become a user turn.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

TOOL_FORMATS = ("default", "qwen", "llama3", "mistral", "glm4")


# ---------------------------------------------------------------- checking what records hold


def normalize_tools(value) -> list[dict]:
    """A record's ``tools``: a list (or a JSON string of a list) of function schemas, in OpenAI's shape."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"'tools' is a string but not valid JSON ({error.msg} at column {error.colno}).") from None
    if not isinstance(value, list):
        raise ValueError(f"'tools' must be a list of function schemas, got {type(value).__name__}.")
    tools = []
    for index, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
            raise ValueError(f"tools[{index}] must be a function schema with a 'name' "
                             "({\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}).")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{index}] ('{function['name']}'): 'parameters' must be a JSON schema object.")
        schema = {"name": function["name"], "description": str(function.get("description") or ""),
                  "parameters": parameters}
        tools.append({"type": "function", "function": schema})
    return tools


def normalize_call(value, where: str, declared: Sequence[str] | None) -> dict:
    """One tool call from a record, as ``{"type": "function", "function": {"name", "arguments": dict}}``.

    Accepts OpenAI's ``{"function": {"name", "arguments"}}`` and the flat ``{"name", "arguments"}`` (ShareGPT's
    function_call value), with arguments as an object or a JSON string of one. ``declared``: the record's tool
    names (a call must name one of them)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON ({error.msg} at column {error.colno}); a call is "
                             "{\"name\": ..., \"arguments\": {...}}.") from None
    call = value.get("function", value) if isinstance(value, dict) else None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        raise ValueError(f"{where} must be a call {{\"name\": ..., \"arguments\": {{...}}}} with a tool name.")
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: the arguments of '{call['name']}' are not valid JSON ({error.msg}).") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: the arguments of '{call['name']}' must be a JSON object.")
    if declared is not None and call["name"] not in declared:
        known = ", ".join(declared) if declared else "none (the record has no 'tools')"
        raise ValueError(f"{where} calls '{call['name']}', which the record does not declare; declared tools: {known}.")
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}


# ---------------------------------------------------------------- writing tools as text


def describe_tools(tools: Sequence[dict], tool_format: str) -> str:
    """The tool list as text for the system prompt, in ``tool_format``."""
    schemas = [tool["function"] for tool in tools]
    if tool_format == "qwen":
        listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        return ("# Tools\n\nThese functions are available, described inside <tools></tools>:\n<tools>\n" + listing
                + "\n</tools>\n\nTo call one, write a JSON object with its name and arguments inside "
                "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
    if tool_format == "llama3":
        listing = "\n\n".join(json.dumps(tool, ensure_ascii=False, indent=4) for tool in tools)
        return ("To call a function, answer with only a JSON object {\"name\": function name, \"parameters\": "
                "object of argument names and values}. The functions:\n\n" + listing)
    if tool_format == "mistral":
        return "[AVAILABLE_TOOLS] " + json.dumps(tools, ensure_ascii=False) + " [/AVAILABLE_TOOLS]"
    if tool_format == "glm4":
        parts = ["# 可用工具"]
        for schema in schemas:
            parts.append(f"\n\n## {schema['name']}\n\n{json.dumps(schema, ensure_ascii=False, indent=4)}\n"
                         "调用上述函数时，先写函数名，再换行写 JSON 格式的参数。")
        return "".join(parts)
    lines = ["You can use these tools:"]
    for schema in schemas:
        lines.append(f"> Tool: {schema['name']}\n  Description: {schema['description']}\n"
                     f"  Arguments (JSON schema): {json.dumps(schema['parameters'], ensure_ascii=False)}")
    lines.append("To use a tool, answer with\nAction: <tool name>\nAction Input: <arguments as JSON>\n"
                 "and wait for its Observation. When no tool is needed, answer directly.")
    return "\n".join(lines)


def format_calls(calls: Sequence[dict], tool_format: str) -> str:
    """An assistant's tool calls as the text the model writes, in ``tool_format``."""
    pairs = [(call["function"]["name"], call["function"]["arguments"]) for call in calls]
    dump = lambda value: json.dumps(value, ensure_ascii=False)  # noqa: E731
    if tool_format == "qwen":
        return "\n".join(f"<tool_call>\n{dump({'name': name, 'arguments': args})}\n</tool_call>" for name, args in pairs)
    if tool_format == "llama3":
        return "\n".join(dump({"name": name, "parameters": args}) for name, args in pairs)
    if tool_format == "mistral":
        return "[TOOL_CALLS] " + dump([{"name": name, "arguments": args} for name, args in pairs])
    if tool_format == "glm4":
        return "\n".join(f"{name}\n{dump(args)}" for name, args in pairs)
    return "\n".join(f"Action: {name}\nAction Input: {dump(args)}" for name, args in pairs)


def format_results(results: Sequence[str], tool_format: str) -> str:
    """Tool results (one per call) as the text of the turn that brings them back."""
    if tool_format == "qwen":
        return "\n".join(f"<tool_response>\n{text}\n</tool_response>" for text in results)
    if tool_format == "mistral":
        return "\n".join(f"[TOOL_RESULTS] {json.dumps({'content': text}, ensure_ascii=False)} [/TOOL_RESULTS]"
                         for text in results)
    if tool_format == "glm4":
        return "\n".join(f"<|observation|>\n{text}" for text in results)
    if tool_format == "llama3":
        return "\n".join(results)
    return "\n".join(f"Observation: {text}" for text in results)


def to_plain_messages(messages: Sequence[dict], tools: Sequence[dict] | None, tool_format: str) -> list[dict]:
    """A conversation with tools as plain system/user/assistant turns, written in ``tool_format``."""
    out: list[dict] = []
    description = describe_tools(tools, tool_format) if tools else ""
    if description:
        if messages and messages[0]["role"] == "system":
            out.append({**messages[0], "content": messages[0]["content"] + "\n\n" + description})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": description})
    results: list[str] = []
    for message in messages:
        if message["role"] == "tool":
            results.append(message["content"])
            continue
        if results:
            out.append({"role": "user", "content": format_results(results, tool_format)})
            results = []
        if message.get("tool_calls"):
            text = format_calls(message["tool_calls"], tool_format)
            content = message.get("content") or ""
            plain = {key: value for key, value in message.items() if key != "tool_calls"}
            out.append({**plain, "content": f"{content}\n{text}" if content.strip() else text})
        else:
            out.append(dict(message))
    if results:
        out.append({"role": "user", "content": format_results(results, tool_format)})
    return out


# ---------------------------------------------------------------- reading calls out of generated text


def _json_objects(text: str) -> list[tuple[int, int, object]]:
    """Every top-level JSON value (object or list) in ``text`` with its span."""
    decoder, found, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index] in "{[":
            try:
                value, end = decoder.raw_decode(text, index)
                found.append((index, end, value))
                index = end
                continue
            except json.JSONDecodeError:
                pass
        index += 1
    return found


def _call(name, arguments) -> dict | None:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def parse_calls(text: str, tool_format: str, tool_names: Sequence[str] = ()) -> tuple[str, list[dict]]:
    """Split generated text into its answer text and tool calls written in ``tool_format``.

    Text that only looks like a call (bad JSON, an undeclared tool when ``tool_names`` is given) stays text."""
    def known(call):
        return call is not None and (not tool_names or call["function"]["name"] in tool_names)

    calls, spans = [], []
    if tool_format == "qwen":
        for match in re.finditer(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
            objects = _json_objects(match.group(1))
            value = objects[0][2] if objects else None
            call = _call(value.get("name"), value.get("arguments", {})) if isinstance(value, dict) else None
            if known(call):
                calls.append(call)
                spans.append(match.span())
    elif tool_format == "mistral":
        match = re.search(r"\[TOOL_CALLS\]\s*", text)
        objects = _json_objects(text[match.end():]) if match else []
        if objects and isinstance(objects[0][2], list):
            found = [_call(item.get("name"), item.get("arguments", {})) for item in objects[0][2] if isinstance(item, dict)]
            if found and all(known(call) for call in found):
                calls, spans = found, [(match.start(), match.end() + objects[0][1])]
    elif tool_format == "glm4":
        for match in re.finditer(r"(?m)^([\w.\-]+)\n(\{.*?\})\s*$", text, re.S):
            call = _call(match.group(1), match.group(2))
            if known(call) and (tool_names or call):
                calls.append(call)
                spans.append(match.span())
    elif tool_format == "llama3":
        for start, end, value in _json_objects(text):
            if isinstance(value, dict) and "name" in value and ("parameters" in value or "arguments" in value):
                call = _call(value["name"], value.get("parameters", value.get("arguments")))
                if known(call):
                    calls.append(call)
                    spans.append((start, end))
    else:
        pattern = r"Action:\s*([^\n]+?)\s*\nAction Input:\s*"
        for match in re.finditer(pattern, text):
            objects = _json_objects(text[match.end():])
            if not objects or objects[0][0] != 0:
                continue
            call = _call(match.group(1).strip(), objects[0][2])
            if known(call):
                calls.append(call)
                spans.append((match.start(), match.end() + objects[0][1]))
    content = text
    for start, end in reversed(spans):
        content = content[:start] + content[end:]
    return content.strip(), calls
