"""Templates: the tokenizer path matches apply_chat_template; every named template has a golden rendering."""

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
