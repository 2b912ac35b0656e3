"""Prompt templates shared by every stage, by inference and by serving.

One template object renders a conversation into the exact text the model sees, and locates the
answer tokens that training puts in the loss. Training and inference both go through it, so what a
model is trained on is what it is asked at inference time, to the character.

Messages use OpenAI's shapes: ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``; an
assistant message may carry ``reasoning_content`` (its reasoning trace) and ``tool_calls``; a
conversation may come with a list of ``tools`` (function schemas).

``get_template(None, tokenizer)`` uses the tokenizer's own chat template (the default). Where that
template cannot be trained as it is (not prefix-preserving: Qwen3, DeepSeek-R1, gpt-oss, Phi-3...), its
training variant from TRL (``trl.chat_template_utils.get_training_chat_template``) is used, and saved with
the trained model so that inference asks exactly what was trained. ``get_template("llama3", tokenizer)``
uses a registered format (:data:`TEMPLATES`; ``qwen3``, ``qwen3-nothink`` and ``deepseek-r1`` are those
families' own Jinja templates); its :attr:`jinja` is saved into the trained model's tokenizer.

``template.py`` at the top level is the public entry (``python template.py`` lists the registered names).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

from medgpt.tool_calls import TOOL_FORMATS, parse_calls, to_plain_messages

Message = dict  # {"role", "content", optional "reasoning_content", "tool_calls"}
SETTINGS_FILE = "medgpt_chat.json"  # enable_thinking / tool_format a model was trained with, saved beside it
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class TemplateError(ValueError):
    """A chat template that cannot render what it was given (named with the fix)."""


class UnknownTemplateError(TemplateError):
    """--template_name is not a registered template."""


class ChatTemplate(Protocol):
    name: str

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               tools: Sequence[dict] | None = None) -> str: ...

    @property
    def stop_words(self) -> list[str]: ...

    @property
    def jinja(self) -> str: ...


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a text that may start with a ``<think>...</think>`` block (or, when the
    prompt opened the block, hold only its end). ``reasoning`` is None when there is no block."""
    if THINK_CLOSE not in text:
        return None, text
    before, after = text.split(THINK_CLOSE, 1)
    stripped = before.strip()
    if before.lstrip().startswith(THINK_OPEN):
        stripped = before.lstrip()[len(THINK_OPEN):].strip()
    elif THINK_OPEN in before:  # text before the block: not a reasoning trace
        return None, text
    return stripped, after.lstrip("\n")


def inline_reasoning(reasoning: str, content: str) -> str:
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{content}"


class _Rendering:
    """What every template does around its own rendering: reasoning, tools, answer spans, parsing answers.

    Subclasses provide ``_render(messages, tools, add_generation_prompt, kwargs) -> (text, marked_spans | None)``
    and the attributes ``tool_format``, ``enable_thinking``, ``reasoning_mode`` ("field" or "inline"),
    ``native_tools``, ``no_reasoning_fix`` (None, "non_thinking" or "empty_reasoning") and ``call_format``.
    """

    def prepare(self, messages: Sequence[Message], tools: Sequence[dict] | None = None):
        """``(messages, tools, kwargs)`` as this template takes them."""
        messages = [dict(m) for m in messages]
        kwargs = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        if self.enable_thinking is False:  # the family's non-thinking form: answers without their reasoning
            for message in messages:
                message.pop("reasoning_content", None)
        has_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if (tools or has_tool_turns) and not self.native_tools:
            messages, tools = to_plain_messages(messages, tools, self.tool_format or "default"), None
        has_reasoning = any(m.get("reasoning_content") is not None for m in messages)
        if self.no_reasoning_fix == "non_thinking" and not has_reasoning and self.enable_thinking is None:
            kwargs["enable_thinking"] = False
        for message in messages:
            if message["role"] != "assistant":
                continue
            reasoning = message.pop("reasoning_content", None)
            if reasoning is None and self.no_reasoning_fix == "empty_reasoning":
                reasoning = ""
            if reasoning is not None:
                if self.reasoning_mode == "field":
                    message["reasoning_content"] = reasoning
                else:
                    message["content"] = inline_reasoning(reasoning, message.get("content") or "")
        return messages, (list(tools) if tools else None), kwargs

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               tools: Sequence[dict] | None = None) -> str:
        messages, tools, kwargs = self.prepare(messages, tools)
        return self._render(messages, tools, add_generation_prompt, kwargs)[0]

    def answer_spans(self, messages: Sequence[Message], tools: Sequence[dict] | None = None):
        """The rendered conversation and, for each assistant message, ``(start, end, reasoning)``: the
        characters it is trained on (after the inference prompt rendered before it, through its end-of-turn
        marker) and the ``(start, end)`` of its reasoning text inside them (None without reasoning)."""
        original = [m for m in messages if m["role"] == "assistant"]
        messages, tools, kwargs = self.prepare(messages, tools)
        text, marked = self._render(messages, tools, False, kwargs)
        positions = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        prompts = [self._render(messages[:index], tools, True, kwargs)[0] for index in positions]
        spans = []
        for number, (index, prompt) in enumerate(zip(positions, prompts)):
            if marked:  # the generation-marked text that ends after this prompt and before the next one
                limit = len(prompts[number + 1]) if number + 1 < len(prompts) else len(text)
                end = max((e for _, e in marked if len(prompt) < e <= limit), default=-1)
            else:
                through = self._render(messages[: index + 1], tools, False, kwargs)[0]
                end = len(through) if text.startswith(through) else -1
            if not text.startswith(prompt) or end <= len(prompt):
                raise TemplateError(
                    f"the chat template '{self.name}' renders assistant turn {number + 1} differently from the "
                    "prompt it asks at inference, so its answer cannot be located. Pass --template_name with a "
                    "registered template (python template.py lists them)."
                )
            reasoning = original[number].get("reasoning_content") if number < len(original) else None
            where = None
            if reasoning and reasoning.strip() and self.enable_thinking is not False:
                found = text.find(reasoning.strip(), len(prompt), end)
                where = (found, found + len(reasoning.strip())) if found >= 0 else None
            spans.append((len(prompt), end, where))
        return text, spans

    def parse_response(self, text: str, tool_names: Sequence[str] = ()) -> dict:
        """A generated answer as ``{"content", "reasoning_content" (or None), "tool_calls" (a list)}``."""
        reasoning, content = split_reasoning(text)
        calls = []
        if self.call_format:
            content, calls = parse_calls(content, self.call_format, tool_names)
        return {"content": content.strip(), "reasoning_content": reasoning, "tool_calls": calls}

    @property
    def settings(self) -> dict:
        """What a later stage or server needs besides the Jinja text to render the same way."""
        return {"enable_thinking": self.enable_thinking, "tool_format": self.tool_format}


@dataclass(frozen=True)
class FormatTemplate(_Rendering):
    """A chat format described by a few format strings.

    Each format holds ``{content}`` where the message text goes; ``{bos}``/``{eos}`` stand for
    the tokenizer's special tokens and are filled in by :meth:`bind`. Reasoning is written inline
    (``<think>...</think>`` before the answer); tools in ``tool_format`` (see medgpt/tool_calls.py).
    """

    name: str
    user: str  # one user turn
    assistant: str  # one assistant answer, ending with its end-of-turn marker
    assistant_prefix: str = ""  # the header that opens an assistant turn (the generation prompt)
    system: str = "{content}"  # a system message; with system_in_user, text put before the first user message
    prefix: str = ""  # once, at the very start
    default_system: str = ""
    system_in_user: bool = False  # formats with no system role fold it into the first user message
    stop: tuple[str, ...] = ()  # end-of-turn strings besides the tokenizer's eos
    tool_format: str | None = None
    enable_thinking: bool | None = None
    reasoning_mode = "inline"
    native_tools = False
    no_reasoning_fix = None

    @property
    def call_format(self) -> str:
        return self.tool_format or "default"

    def bind(self, bos: str | None, eos: str | None) -> "FormatTemplate":
        """Replace {bos}/{eos} by the tokenizer's tokens."""
        fields = ("user", "assistant", "assistant_prefix", "system", "prefix")
        values = {}
        for field in fields:
            text = getattr(self, field)
            for key, token in (("{bos}", bos), ("{eos}", eos)):
                if key in text:
                    if not token:
                        raise TemplateError(
                            f"Template '{self.name}' needs the tokenizer's {key[1:-1]} token, but the tokenizer "
                            f"has none. Pick another --template_name or set the token on the tokenizer."
                        )
                    text = text.replace(key, token)
            values[field] = text
        stop = tuple(s.replace("{eos}", eos or "") for s in self.stop if s.replace("{eos}", eos or ""))
        return replace(self, stop=stop, **values)

    def _render(self, messages, tools, add_generation_prompt, kwargs):
        system, turns = _split_system(messages, self.default_system)
        parts = [self.prefix]
        if system and not self.system_in_user:
            parts.append(self.system.format(content=system))
        for index, message in enumerate(turns):
            content = message["content"]
            if message["role"] == "user":
                if index == 0 and system and self.system_in_user:
                    content = self.system.format(content=system) + content
                parts.append(self.user.format(content=content))
            else:
                parts.append(self.assistant_prefix + self.assistant.format(content=content))
        if add_generation_prompt:
            parts.append(self.assistant_prefix)
        return "".join(parts), None

    @property
    def stop_words(self) -> list[str]:
        return list(self.stop)

    @property
    def jinja(self) -> str:
        """The same format as a Jinja chat template, for ``tokenizer.chat_template`` and vLLM."""

        def lit(text: str) -> str:  # a Jinja string literal (json escapes are valid Jinja escapes)
            return json.dumps(text)

        def around(fmt: str, inner: str) -> str:
            before, after = fmt.split("{content}")
            return f"{lit(before)} + {inner} + {lit(after)}"

        return (
            "{% if messages and messages[0]['role'] == 'system' %}"
            + "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
            + "{% else %}{% set system = "
            + lit(self.default_system)
            + " %}{% set turns = messages %}{% endif %}"
            + "{{ " + lit(self.prefix) + " }}"
            + ("" if self.system_in_user else "{% if system %}{{ " + around(self.system, "system") + " }}{% endif %}")
            + "{% for message in turns %}"
            + "{% if message['role'] == 'user' %}"
            + (
                "{% if loop.first and system %}{{ "
                + around(self.user, around(self.system, "system") + " + message['content']")
                + " }}{% else %}{{ "
                + around(self.user, "message['content']")
                + " }}{% endif %}"
                if self.system_in_user
                else "{{ " + around(self.user, "message['content']") + " }}"
            )
            + "{% else %}{{ " + lit(self.assistant_prefix) + " + " + around(self.assistant, "message['content']") + " }}"
            + "{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}{{ " + lit(self.assistant_prefix) + " }}{% endif %}"
        )


_PROBE_ANSWER, _PROBE_REASONING = "ANSWER_PROBE_7f3a", "REASONING_PROBE_7f3a"
_PROBE_TOOL = {"type": "function", "function": {"name": "lookup_probe_7f3a", "description": "probe",
                                                "parameters": {"type": "object", "properties": {"key_probe": {"type": "string"}}}}}
_PROBE_CALL = {"type": "function", "function": {"name": "lookup_probe_7f3a", "arguments": {"key_probe": "value_probe"}}}


class JinjaTemplate(_Rendering):
    """A Jinja chat template: the tokenizer's own (``name="tokenizer"``) or a registered family's.

    Its training variant is used where TRL has one; how it renders reasoning, tools, a system prompt and an
    answer without reasoning is found by rendering probe conversations once, here."""

    def __init__(self, tokenizer, jinja: str | None = None, name: str = "tokenizer",
                 tool_format: str | None = None, enable_thinking: bool | None = None):
        source = jinja or getattr(tokenizer, "chat_template", None)
        if not source:
            raise TemplateError(
                "The tokenizer has no chat template of its own, so a template must be named: pass "
                f"--template_name with one of: {', '.join(sorted(TEMPLATES))}."
            )
        self.name, self.tokenizer = name, tokenizer
        self.tool_format, self.enable_thinking = tool_format, enable_thinking
        self.template = training_variant(tokenizer, source)
        self.special = {key: value for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
        self.marked = "generation" in self.template and _has_generation_markers(self.template)
        self.content_parts = self.fold_system = False
        self.reasoning_mode, self.native_tools, self.no_reasoning_fix, self.call_format = "field", False, None, None
        self._probe()

    # ---- rendering
    def _render(self, messages, tools, add_generation_prompt, kwargs):
        from transformers.utils.chat_template_utils import render_jinja_template

        if self.fold_system and messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], [dict(m) for m in messages[1:]]
            if messages and messages[0]["role"] == "user":
                messages[0]["content"] = f"{system}\n\n{messages[0]['content']}"
        if self.content_parts:
            messages = [{**m, "content": [{"type": "text", "text": m.get("content") or ""}]} for m in messages]
        try:
            texts, spans = render_jinja_template(
                [list(messages)], tools=tools, chat_template=self.template, add_generation_prompt=add_generation_prompt,
                return_assistant_tokens_mask=self.marked, **{**self.special, **kwargs},
            )
        except Exception as error:  # jinja2 errors, and TypeErrors of templates that index what they were given
            raise TemplateError(f"the chat template '{self.name}' refuses this conversation "
                                f"({type(error).__name__}: {error}).") from None
        return texts[0], (spans[0] if self.marked else None)

    # ---- what the template can do, found once by rendering probes
    def _probe(self):
        user = [{"role": "user", "content": "Hi"}]
        if "USER_PROBE" not in self._try_render([{"role": "user", "content": "USER_PROBE"}], None, True, {}):
            self.content_parts = True  # vision-language templates read content as a list of parts
            if "USER_PROBE" not in self._try_render([{"role": "user", "content": "USER_PROBE"}], None, True, {}):
                raise TemplateError(f"the chat template '{self.name}' does not render a user's text. Pass "
                                    "--template_name with a registered template (python template.py lists them).")
        try:
            self._render([{"role": "system", "content": "S"}, *user], None, True, {})
        except TemplateError:
            self.fold_system = True  # no system role (Gemma): the system prompt opens the first user turn
        answer = {"role": "assistant", "content": _PROBE_ANSWER, "reasoning_content": _PROBE_REASONING}
        if _PROBE_REASONING not in self._try_render([*user, answer]):
            self.reasoning_mode = "inline"
        self.no_reasoning_fix = self._find_no_reasoning_fix(user)
        if self.tool_format is None:
            calls = [*user, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
                     {"role": "tool", "name": "lookup_probe_7f3a", "content": "RESULT_PROBE_7f3a"}]
            rendered = self._try_render(calls, [_PROBE_TOOL], kwargs={})
            self.native_tools = all(s in rendered for s in ("lookup_probe_7f3a", "value_probe", "RESULT_PROBE_7f3a"))
        self.call_format = self._find_call_format() if self.native_tools else (self.tool_format or "default")

    def _try_render(self, messages, tools=None, add_generation_prompt=False, kwargs=None) -> str:
        try:
            return self.render(messages, add_generation_prompt, tools) if kwargs is None else \
                self._render(messages, tools, add_generation_prompt, kwargs)[0]
        except TemplateError:
            return ""

    def _find_no_reasoning_fix(self, user):
        """How an answer without reasoning must be rendered so that the inference prompt stays its prefix."""
        base = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        plain = [*user, {"role": "assistant", "content": _PROBE_ANSWER}]
        options = [(None, base), ("non_thinking", {**base, "enable_thinking": False}), ("empty_reasoning", base)]
        for fix, kwargs in options:
            if fix == "non_thinking" and ("enable_thinking" not in self.template or self.enable_thinking is not None):
                continue
            messages = plain
            if fix == "empty_reasoning":
                empty = inline_reasoning("", _PROBE_ANSWER)
                messages = [*user, {"role": "assistant", "content": empty} if self.reasoning_mode == "inline"
                            else {"role": "assistant", "content": _PROBE_ANSWER, "reasoning_content": ""}]
            prompt = self._try_render(user, None, True, kwargs)
            full = self._try_render(messages, None, False, kwargs)
            if prompt and full.startswith(prompt) and _PROBE_ANSWER in full[len(prompt):]:
                return fix
        raise TemplateError(
            f"the chat template '{self.name}' does not continue its own inference prompt when it renders an answer, "
            "so answers cannot be trained with it. Pass --template_name with a registered template "
            "(python template.py lists them)."
        )

    def _find_call_format(self) -> str | None:
        """Which text format the template writes tool calls in (to read them back out of generated text)."""
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}]
        try:
            text, spans = self.answer_spans(messages, [_PROBE_TOOL])
        except TemplateError:
            return None
        start, end, _ = spans[-1]
        for tool_format in TOOL_FORMATS:
            _, calls = parse_calls(text[start:end], tool_format, ["lookup_probe_7f3a"])
            if calls and calls[0]["function"]["arguments"] == {"key_probe": "value_probe"}:
                return tool_format
        return None

    @property
    def stop_words(self) -> list[str]:
        """The end-of-turn text the template writes after a final answer (e.g. <|im_end|>, <|eot_id|>)."""
        try:
            text, spans = self.answer_spans([{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": _PROBE_ANSWER}])
        except TemplateError:
            return []
        start, end, _ = spans[-1]
        after = text[start:end].split(_PROBE_ANSWER, 1)[-1].split()
        return after[:1]  # up to the first space: Phi-3 ends an answer "<|end|>\n" and adds EOS after the last

    @property
    def jinja(self) -> str:
        return self.template


TokenizerTemplate = JinjaTemplate  # the tokenizer's own chat template (name="tokenizer")


def _has_generation_markers(template: str) -> bool:
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def training_variant(tokenizer, jinja: str) -> str:
    """TRL's training variant of a chat template (prefix-preserving, with generation markers), or the
    template itself where TRL has none or it needs none."""
    from trl.chat_template_utils import get_training_chat_template

    probe = copy.copy(tokenizer)
    probe.chat_template = jinja
    try:
        variant = get_training_chat_template(probe) or jinja
    except Exception:  # TRL has no patch for this family: the probes check it instead
        variant = jinja
    for broken, fixed in _OWN_PATCHES:
        variant = variant.replace(broken, fixed)
    return variant


# Fixes TRL's training variants still need: (text, replacement).
_OWN_PATCHES = [
    # DeepSeek-V3 (R1-0528 style): its prompt opens <think>, but it drops the reasoning of every answer it renders,
    # which would remove the reasoning from what is trained. Render the answer whole, as the R1-distill variant does.
    ("{% set content = message['content'] %}{% if '</think>' in content %}"
     "{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content",
     "{% set content = message['content'] %}{{'<｜Assistant｜>' + content"),
]


def _split_system(messages: Sequence[Message], default_system: str) -> tuple[str, list[Message]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return default_system, list(messages)


def split_stop_words(template: ChatTemplate, tokenizer) -> tuple[list[int], list[str]]:
    """The template's stop words as (token ids of those that are one token, the others as strings).

    A one-token stop word (often a special token such as <|im_end|>) must be matched as a token id:
    generated text is decoded without special tokens, so a string match would never see it."""
    vocab = tokenizer.get_vocab()
    return ([vocab[word] for word in template.stop_words if word in vocab],
            [word for word in template.stop_words if word not in vocab])


def encode_conversation(template: ChatTemplate, tokenizer, messages: Sequence[Message],
                        tools: Sequence[dict] | None = None, train_on_reasoning: bool = True):
    """Token ids and labels of a conversation: only assistant answers carry labels.

    The ids are the tokenization of ``template.render(messages)``, i.e. exactly the text the
    model sees at inference. Each assistant answer spans from the end of the inference prompt
    rendered before it to its end-of-turn marker, inclusive. With ``train_on_reasoning`` false the
    reasoning text stays in the input but out of the labels. Returns ``(input_ids, labels, turn_ends)``
    where ``turn_ends[k]`` is the token index just past the k-th assistant answer.
    """
    text, spans = template.answer_spans(messages, tools)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    labels = [-100] * len(input_ids)
    turn_ends = []
    position = 0
    for start, end, reasoning in spans:
        while position < len(input_ids) and offsets[position][0] < start:
            position += 1
        while position < len(input_ids) and offsets[position][0] < end:
            inside_reasoning = reasoning and reasoning[0] <= offsets[position][0] < reasoning[1]
            if train_on_reasoning or not inside_reasoning:
                labels[position] = input_ids[position]
            position += 1
        turn_ends.append(position)
    return input_ids, labels, turn_ends


_CHATML = FormatTemplate(
    name="chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    stop=("<|im_end|>",),
)

TEMPLATES: dict[str, FormatTemplate] = {
    t.name: t
    for t in [
        _CHATML,
        replace(_CHATML, name="qwen", default_system="You are a helpful assistant."),
        FormatTemplate(
            name="llama3",
            prefix="{bos}",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant="{content}<|eot_id|>",
            stop=("<|eot_id|>",),
        ),
        FormatTemplate(
            name="llama2",
            system="<<SYS>>\n{content}\n<</SYS>>\n\n",
            system_in_user=True,
            user="{bos}[INST] {content} [/INST]",
            assistant=" {content} {eos}",
            stop=("{eos}",),
        ),
        FormatTemplate(
            name="mistral",
            prefix="{bos}",
            system="{content}\n\n",
            system_in_user=True,
            user="[INST] {content} [/INST]",
            assistant="{content}{eos}",
            stop=("{eos}",),
        ),
        FormatTemplate(
            name="vicuna",
            default_system=(
                "A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions."
            ),
            system="{content} ",
            user="USER: {content} ",
            assistant_prefix="ASSISTANT:",
            assistant=" {content}{eos}",
            stop=("{eos}",),
        ),
        FormatTemplate(
            name="alpaca",
            default_system=(
                "Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request."
            ),
            system="{content}\n\n",
            user="### Instruction:\n{content}\n\n",
            assistant_prefix="### Response:\n",
            assistant="{content}{eos}\n\n",
            stop=("{eos}",),
        ),
        FormatTemplate(
            name="baichuan2",
            user="<reserved_106>{content}",
            assistant_prefix="<reserved_107>",
            assistant="{content}{eos}",
            stop=("{eos}",),
        ),
        FormatTemplate(
            name="chatglm3",
            prefix="[gMASK]sop",
            system="<|system|>\n {content}",
            user="<|user|>\n {content}",
            assistant_prefix="<|assistant|>",
            assistant="\n {content}{eos}",
            stop=("{eos}", "<|user|>", "<|observation|>"),
        ),
        FormatTemplate(
            name="gemma",
            prefix="{bos}",
            system="{content}\n\n",
            system_in_user=True,
            user="<start_of_turn>user\n{content}<end_of_turn>\n",
            assistant_prefix="<start_of_turn>model\n",
            assistant="{content}<end_of_turn>\n",
            stop=("<end_of_turn>",),
        ),
        FormatTemplate(
            name="phi3",
            system="<|system|>\n{content}<|end|>\n",
            user="<|user|>\n{content}<|end|>\n",
            assistant_prefix="<|assistant|>\n",
            assistant="{content}<|end|>\n",
            stop=("<|end|>",),
        ),
        FormatTemplate(
            name="deepseek",
            prefix="{bos}",
            system="{content}\n\n",
            user="User: {content}\n\n",
            assistant_prefix="Assistant:",
            assistant=" {content}{eos}",
            stop=("{eos}",),
        ),
        FormatTemplate(
            name="huatuo",
            default_system=(
                "以下是病人与医生之间的多轮对话。医生认真、谨慎地回答病人的问题，遇到急症会建议立即就医，"
                "并提醒回答不能代替面诊。"
            ),
            system="{content}\n",
            user="<病人>：{content}\n",
            assistant_prefix="<医生>：",
            assistant="{content}{eos}\n",
            stop=("{eos}",),
        ),
    ]
}


def _trl_template(file_name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / file_name).read_text(encoding="utf-8")


# Registered model families whose format is their own Jinja template (file in trl/chat_templates, enable_thinking)
JINJA_TEMPLATES: dict[str, tuple[str, bool | None]] = {
    "qwen3": ("qwen3.jinja", None),  # thinking: answers carry their reasoning in a <think> block
    "qwen3-nothink": ("qwen3.jinja", False),  # Qwen3's non-thinking form (empty <think> block in the prompt)
    "deepseek-r1": ("deepseek_r1_distill.jinja", None),  # DeepSeek-R1 distills: the prompt opens <think>
}


def model_settings(tokenizer) -> dict:
    """The enable_thinking / tool_format a trained model was saved with (medgpt_chat.json beside it)."""
    path = Path(str(getattr(tokenizer, "name_or_path", "") or ""), SETTINGS_FILE)
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def get_template(name: str | None, tokenizer, tool_format: str | None = None,
                 enable_thinking: bool | None = None) -> ChatTemplate:
    """The template called ``name``, bound to ``tokenizer``; ``None`` means the tokenizer's own.

    ``tool_format`` writes tool calls as text in that format (default: the template's own tool support,
    else ``default``); ``enable_thinking`` false renders the non-thinking form. Unset, both come from the
    model's saved settings (a model trained by MedGPT), else the template's defaults."""
    if tool_format is not None and tool_format not in TOOL_FORMATS:
        raise UnknownTemplateError(f"Unknown --tool_format '{tool_format}'. Valid: {', '.join(TOOL_FORMATS)}.")
    saved = model_settings(tokenizer)
    tool_format = tool_format if tool_format is not None else saved.get("tool_format")
    enable_thinking = enable_thinking if enable_thinking is not None else saved.get("enable_thinking")
    if name in (None, "", "default", "tokenizer"):
        return JinjaTemplate(tokenizer, tool_format=tool_format, enable_thinking=enable_thinking)
    if name in JINJA_TEMPLATES:
        file_name, thinking = JINJA_TEMPLATES[name]
        return JinjaTemplate(tokenizer, _trl_template(file_name), name, tool_format,
                             thinking if enable_thinking is None else enable_thinking)
    if name not in TEMPLATES:
        raise UnknownTemplateError(
            f"Unknown --template_name '{name}'. Valid names: {', '.join(sorted([*TEMPLATES, *JINJA_TEMPLATES]))} "
            "(or leave it unset to use the tokenizer's own chat template)."
        )
    template = TEMPLATES[name].bind(getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None))
    return replace(template, tool_format=tool_format, enable_thinking=enable_thinking)

