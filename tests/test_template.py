"""Templates: the tokenizer path matches apply_chat_template; every named template has a golden rendering."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from template import TEMPLATES, encode_conversation, get_template

CONVERSATION = [
    {"role": "system", "content": "Be careful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Fever?"},
    {"role": "assistant", "content": "Rest."},
]
SPECIAL = SimpleNamespace(bos_token="<s>", eos_token="</s>", chat_template=None)

GOLDEN = {
    "chatml": "<|im_start|>system\nBe careful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "Hello.<|im_end|>\n<|im_start|>user\nFever?<|im_end|>\n<|im_start|>assistant\nRest.<|im_end|>\n",
    "qwen": "<|im_start|>system\nBe careful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "Hello.<|im_end|>\n<|im_start|>user\nFever?<|im_end|>\n<|im_start|>assistant\nRest.<|im_end|>\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe careful.<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nFever?<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    "\n\nRest.<|eot_id|>",
    "llama2": "<s>[INST] <<SYS>>\nBe careful.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Fever? [/INST] Rest. </s>",
    "mistral": "<s>[INST] Be careful.\n\nHi [/INST]Hello.</s>[INST] Fever? [/INST]Rest.</s>",
    "vicuna": "Be careful. USER: Hi ASSISTANT: Hello.</s>USER: Fever? ASSISTANT: Rest.</s>",
    "alpaca": "Be careful.\n\n### Instruction:\nHi\n\n### Response:\nHello.</s>\n\n### Instruction:\nFever?\n\n"
    "### Response:\nRest.</s>\n\n",
    "baichuan2": "Be careful.<reserved_106>Hi<reserved_107>Hello.</s><reserved_106>Fever?<reserved_107>Rest.</s>",
    "chatglm3": "[gMASK]sop<|system|>\n Be careful.<|user|>\n Hi<|assistant|>\n Hello.</s><|user|>\n Fever?"
    "<|assistant|>\n Rest.</s>",
    "gemma": "<s><start_of_turn>user\nBe careful.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\nFever?<end_of_turn>\n<start_of_turn>model\nRest.<end_of_turn>\n",
    "phi3": "<|system|>\nBe careful.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nFever?<|end|>\n"
    "<|assistant|>\nRest.<|end|>\n",
    "deepseek": "<s>Be careful.\n\nUser: Hi\n\nAssistant: Hello.</s>User: Fever?\n\nAssistant: Rest.</s>",
    "huatuo": "Be careful.\n<病人>：Hi\n<医生>：Hello.</s>\n<病人>：Fever?\n<医生>：Rest.</s>\n",
}


def test_every_registered_template_has_a_golden_rendering():
    assert set(GOLDEN) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_named_template_golden(name):
    assert get_template(name, SPECIAL).render(CONVERSATION) == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("cut", [5, 4, 3, 2])
def test_named_template_jinja_renders_the_same(name, cut, tokenizer):
    """The Jinja form saved with a trained model renders exactly like the template object."""
    template = get_template(name, tokenizer)
    messages = CONVERSATION[:cut] if cut != 2 else CONVERSATION[1:3]
    for generation in (False, True):
        expected = template.render(messages, add_generation_prompt=generation)
        actual = tokenizer.apply_chat_template(
            messages, chat_template=template.jinja, tokenize=False, add_generation_prompt=generation
        )
        assert actual == expected


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[:4]])
def test_default_template_is_the_tokenizers_own(tokenizer, messages):
    template = get_template(None, tokenizer)
    generation = messages[-1]["role"] == "user"
    text = template.render(messages, add_generation_prompt=generation)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
    expected_ids = expected_ids["input_ids"] if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys") else expected_ids
    assert ids == list(expected_ids)


def test_unknown_template_lists_valid_names(tokenizer):
    with pytest.raises(ValueError) as error:
        get_template("no-such-template", tokenizer)
    for name in ("chatml", "llama3", "huatuo"):
        assert name in str(error.value)


def test_tokenizer_without_chat_template_asks_for_a_name():
    with pytest.raises(ValueError, match="--template_name"):
        get_template(None, SimpleNamespace(chat_template=None))


@pytest.mark.parametrize("name", [None, "chatml", "llama3", "huatuo"])
def test_only_assistant_tokens_carry_labels(tokenizer, name):
    template = get_template(name, tokenizer)
    ids, labels, turn_ends = encode_conversation(template, tokenizer, CONVERSATION)
    assert len(ids) == len(labels)
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    end_of_turn = "<|eot_id|>" if name == "llama3" else tokenizer.eos_token
    # both answers, each with its end-of-turn token; nothing of the prompts
    assert "Hello." in trained and "Rest." in trained
    assert trained.count(end_of_turn) == 2
    assert "Hi" not in trained and "Fever?" not in trained and "Be careful" not in trained
    assert len(turn_ends) == 2
    assert all(labels[end - 1] != -100 for end in turn_ends)
    assert all(label == -100 for label in labels[turn_ends[-1]:])


@pytest.mark.parametrize("name", [None, "chatml", "llama2", "alpaca"])
def test_training_tokens_are_the_inference_prompt(tokenizer, name):
    """What precedes each answer in training is token-for-token the prompt used at inference."""
    template = get_template(name, tokenizer)
    ids, labels, _ = encode_conversation(template, tokenizer, CONVERSATION)
    for index in (2, 4):  # the two assistant turns
        prompt = template.render(CONVERSATION[:index], add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert labels[len(prompt_ids)] != -100 and labels[len(prompt_ids) - 1] == -100


# ---------------------------------------------------------------- every chat template trl ships


def _shipped_templates():
    import trl

    folder = Path(trl.__file__).parent / "chat_templates"
    return sorted(p.stem for p in folder.glob("*.jinja") if not p.stem.endswith("_training"))


@pytest.fixture()
def family_tokenizer(tokenizer):
    """The embedded tokenizer wearing another family's chat template (set per test)."""
    import copy

    return copy.copy(tokenizer)


@pytest.mark.parametrize("family", _shipped_templates())
@pytest.mark.parametrize("turns", [3, 5])
def test_every_shipped_chat_template_trains_exactly_the_answers(family_tokenizer, family, turns):
    """With the family's own template (its training variant where it needs one): each answer is trained on
    exactly its text and end-of-turn marker, nothing of the prompts, and the inference prompt for the last
    turn is the trained text up to that answer."""
    import trl

    family_tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / f"{family}.jinja").read_text()
    template = get_template(None, family_tokenizer)
    conversation = CONVERSATION[:turns]
    text, spans = template.answer_spans(conversation)
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert len(spans) == len(answers)
    stop = template.stop_words[0]
    for (start, end, reasoning), answer in zip(spans, answers):
        segment = text[start:end]
        before, after = segment.split(answer, 1)
        assert re.fullmatch(r"(<[^<>]+>\s*)+", after.strip()), segment  # the answer, then end-of-turn markup only
        if end == spans[-1][1]:  # the final answer ends with the marker generation stops at (then at most EOS)
            assert after.strip().startswith(stop) and after.strip()[len(stop):].strip() in ("", family_tokenizer.eos_token)
        # before the answer only the template's answer framing (an empty <think> block, a channel header)
        assert not any(word in before for word in ("Hi", "Fever", "Be careful", "Hello", "Rest")), before
        assert reasoning is None
    last_prompt = template.render(conversation[:-1], add_generation_prompt=True)
    assert text.startswith(last_prompt) and len(last_prompt) == spans[-1][0]
    # token level: exactly the tokens that start inside an answer span carry labels
    ids, labels, _ = encode_conversation(template, family_tokenizer, conversation)
    offsets = family_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    inside = [any(s <= first < e for s, e, _ in spans) for first, _ in offsets]
    assert [label != -100 for label in labels] == inside
    assert ids == family_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_template_that_cannot_be_trained_is_one_line_naming_the_fix(family_tokenizer):
    family_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}" \
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    with pytest.raises(ValueError, match="--template_name") as error:
        get_template(None, family_tokenizer)
    assert "\n" not in str(error.value)


def test_script_with_an_untrainable_template_ends_with_a_message_not_a_traceback(tiny_model_dir, tmp_path,
                                                                                 sft_data_dir):
    import shutil

    from conftest import run_script

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}" \
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    result = run_script("supervised_finetuning.py", "--model_name_or_path", str(model), "--train_file_dir",
                        str(sft_data_dir / "train"), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                        check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "--template_name" in result.stderr


@pytest.mark.parametrize("name, opening", [("qwen3", "<|im_start|>assistant\n"),
                                           ("qwen3-nothink", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
                                           ("deepseek-r1", "<｜Assistant｜><think>\n")])
def test_registered_reasoning_families(tokenizer, name, opening):
    template = get_template(name, tokenizer)
    prompt = template.render(CONVERSATION[:4], add_generation_prompt=True)
    assert prompt.endswith(opening)
    conversation = CONVERSATION[:3]
    conversation[-1] = {"role": "assistant", "content": "Hello.", "reasoning_content": "They greet me."}
    text, spans = template.answer_spans(conversation)
    trained = text[spans[-1][0]:spans[-1][1]]
    if name == "qwen3-nothink":  # the non-thinking form: no reasoning at all
        assert "They greet me." not in text and trained.startswith("Hello.")
    else:
        assert "They greet me." in trained and trained.index("They greet me.") < trained.index("Hello.")
