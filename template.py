"""Prompt templates shared by every stage, by inference and by serving.

One template object renders a conversation (a list of ``{"role", "content"}`` messages with
roles ``system``/``user``/``assistant``) into the exact text the model sees. Training and
inference both go through :meth:`render`, so what a model is trained on is what it is asked at
inference time, to the character.

``get_template(None, tokenizer)`` uses the tokenizer's own chat template (the default).
``get_template("llama3", tokenizer)`` uses a named format from :data:`TEMPLATES`; its
:attr:`jinja` is saved into the trained model's tokenizer so that vLLM, ``apply_chat_template``
and every later stage render it the same way.

Run ``python template.py`` to list the registered names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class ChatTemplate(Protocol):
    name: str

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str: ...

    @property
    def stop_words(self) -> list[str]: ...

    @property
    def jinja(self) -> str: ...


@dataclass(frozen=True)
class FormatTemplate:
    """A chat format described by a few format strings.

    Each format holds ``{content}`` where the message text goes; ``{bos}``/``{eos}`` stand for
    the tokenizer's special tokens and are filled in by :meth:`bind`.
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

    def bind(self, bos: str | None, eos: str | None) -> "FormatTemplate":
        """Replace {bos}/{eos} by the tokenizer's tokens."""
        fields = ("user", "assistant", "assistant_prefix", "system", "prefix")
        values = {}
        for field in fields:
            text = getattr(self, field)
            for key, token in (("{bos}", bos), ("{eos}", eos)):
                if key in text:
                    if not token:
                        raise ValueError(
                            f"Template '{self.name}' needs the tokenizer's {key[1:-1]} token, but the tokenizer "
                            f"has none. Pick another --template_name or set the token on the tokenizer."
                        )
                    text = text.replace(key, token)
            values[field] = text
        stop = tuple(s.replace("{eos}", eos or "") for s in self.stop if s.replace("{eos}", eos or ""))
        return replace(self, stop=stop, **values)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
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
        return "".join(parts)

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


class TokenizerTemplate:
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``)."""

    name = "tokenizer"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "The tokenizer has no chat template of its own, so a template must be named: pass "
                f"--template_name with one of: {', '.join(sorted(TEMPLATES))}."
            )
        self.tokenizer = tokenizer

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @property
    def stop_words(self) -> list[str]:
        return []  # the tokenizer's eos (and generation_config) already mark the end of a turn

    @property
    def jinja(self) -> str:
        return self.tokenizer.chat_template


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


def encode_conversation(template: ChatTemplate, tokenizer, messages: Sequence[Message]):
    """Token ids and labels of a conversation: only assistant answers carry labels.

    The ids are the tokenization of ``template.render(messages)``, i.e. exactly the text the
    model sees at inference. Each assistant answer spans from the end of the generation prompt
    rendered before it to the end of the conversation rendered through it, so it includes the
    end-of-turn marker. Returns ``(input_ids, labels, turn_ends)`` where ``turn_ends[k]`` is the
    token index just past the k-th assistant answer.
    """
    text = template.render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:index], add_generation_prompt=True)
        through = template.render(messages[: index + 1])
        if not text.startswith(through) or not through.startswith(prompt):
            raise ValueError(
                f"Template '{template.name}' does not render conversations prefix by prefix (rendering "
                f"turn {index + 1} changes earlier text), so assistant turns cannot be located. "
                "Pass --template_name with a registered template."
            )
        spans.append((len(prompt), len(through)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    labels = [-100] * len(input_ids)
    turn_ends = []
    position = 0
    for start, end in spans:
        while position < len(input_ids) and offsets[position][0] < start:
            position += 1
        while position < len(input_ids) and offsets[position][0] < end:
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


class UnknownTemplateError(ValueError):
    """--template_name is not a registered template."""


def get_template(name: str | None, tokenizer) -> ChatTemplate:
    """The template called ``name``, bound to ``tokenizer``; ``None`` means the tokenizer's own."""
    if name in (None, "", "default", "tokenizer"):
        return TokenizerTemplate(tokenizer)
    if name not in TEMPLATES:
        raise UnknownTemplateError(
            f"Unknown --template_name '{name}'. Valid names: {', '.join(sorted(TEMPLATES))} "
            "(or leave it unset to use the tokenizer's own chat template)."
        )
    return TEMPLATES[name].bind(getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None))


if __name__ == "__main__":
    print("Registered templates:", ", ".join(sorted(TEMPLATES)))
    print("Leave --template_name unset to use the tokenizer's own chat template.")
