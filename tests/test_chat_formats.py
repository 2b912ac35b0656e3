"""Reasoning traces and tool calls: read from the formats users bring, checked, rendered, labelled, parsed back."""

import json

import pytest

from conftest import write_jsonl
from medgpt.data_files import json_reader
from medgpt.records import DataError, conversation_from_record, preference_from_record
from medgpt.tool_calls import TOOL_FORMATS, format_calls, parse_calls
from template import encode_conversation, get_template

TOOLS = [{"type": "function", "function": {
    "name": "check_drug_interaction", "description": "Interaction between two drugs",
    "parameters": {"type": "object", "properties": {"drug_a": {"type": "string"}, "drug_b": {"type": "string"}},
                   "required": ["drug_a", "drug_b"]}}}]
CALL = {"name": "check_drug_interaction", "arguments": {"drug_a": "warfarin", "drug_b": "aspirin"}}
RESULT = '{"severity": "major", "effect": "bleeding risk"}'
ANSWER = "Together they raise bleeding risk; ask your doctor before taking aspirin."

SHAREGPT = {"conversations": [
    {"from": "human", "value": "Can I take aspirin with warfarin?"},
    {"from": "function_call", "value": json.dumps(CALL)},
    {"from": "observation", "value": RESULT},
    {"from": "gpt", "value": ANSWER}], "tools": json.dumps(TOOLS)}
OPENAI = {"messages": [
    {"role": "system", "content": "You are a careful pharmacist."},
    {"role": "user", "content": "Can I take aspirin with warfarin?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": CALL["name"], "arguments": json.dumps(CALL["arguments"])}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
    {"role": "assistant", "content": ANSWER}], "tools": TOOLS}


def trained_text(template, tokenizer, messages, tools=None, **kwargs):
    ids, labels, _ = encode_conversation(template, tokenizer, messages, tools, **kwargs)
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != -100]), tokenizer.decode(ids)


def qwen3(tokenizer, **kwargs):
    return get_template("qwen3", tokenizer, **kwargs)


# ---------------------------------------------------------------- reading


def test_both_tool_forms_read_to_the_same_conversation():
    sharegpt, openai = conversation_from_record(SHAREGPT), conversation_from_record(OPENAI)
    assert sharegpt.tools == openai.tools == TOOLS
    assert list(sharegpt) == list(openai)[1:]
    assert openai[2] == {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]}
    assert openai[3] == {"role": "tool", "content": RESULT}


@pytest.mark.parametrize("record, message", [
    ({**SHAREGPT, "tools": "[{not json"}, "'tools' is a string but not valid JSON"),
    ({**SHAREGPT, "tools": {"name": "x"}}, "'tools' must be a list of function schemas"),
    ({**SHAREGPT, "tools": [{"description": "no name"}]}, "tools[0] must be a function schema with a 'name'"),
    ({**SHAREGPT, "conversations": [SHAREGPT["conversations"][0], {"from": "function_call", "value": "{bad"},
                                    *SHAREGPT["conversations"][2:]]}, "is not valid JSON"),
    ({**SHAREGPT, "conversations": [SHAREGPT["conversations"][0], {"from": "function_call", "value": '{"arguments": {}}'},
                                    *SHAREGPT["conversations"][2:]]}, "with a tool name"),
    ({**SHAREGPT, "conversations": [SHAREGPT["conversations"][0],
                                    {"from": "function_call", "value": '{"name": "dose_calculator", "arguments": {}}'},
                                    *SHAREGPT["conversations"][2:]]}, "calls 'dose_calculator', which the record does not declare"),
    ({**SHAREGPT, "tools": None}, "declared tools: none"),
    ({**SHAREGPT, "conversations": SHAREGPT["conversations"][:3]}, "ends with a tool result"),
    ({**SHAREGPT, "conversations": [SHAREGPT["conversations"][0], SHAREGPT["conversations"][2],
                                    SHAREGPT["conversations"][3]]}, "expected assistant after user, got tool"),
    ({**SHAREGPT, "conversations": [*SHAREGPT["conversations"][:2], SHAREGPT["conversations"][3]]},
     "a tool call needs its result"),
])
def test_bad_tool_records_name_file_line_and_fix(tmp_path, record, message):
    path = write_jsonl(tmp_path / "tools.jsonl", [SHAREGPT, record])
    with pytest.raises(DataError) as error:
        json_reader(conversation_from_record)([path])
    assert f"{path}:2:" in str(error.value) and message in str(error.value)
    assert f"{path}:1:" not in str(error.value)


def test_reasoning_is_read_from_a_field_or_a_leading_think_block():
    field = conversation_from_record({"messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "content": "Rest and fluids.", "reasoning_content": "A mild fever."}]})
    inline = conversation_from_record({"conversations": [{"from": "human", "value": "q"}, {
        "from": "gpt", "value": "<think>\nA mild fever.\n</think>\n\nRest and fluids."}]})
    assert list(field) == list(inline)
    assert field[-1] == {"role": "assistant", "content": "Rest and fluids.", "reasoning_content": "A mild fever."}
    with pytest.raises(ValueError, match="no answer after it"):
        conversation_from_record({"conversations": [{"from": "human", "value": "q"},
                                                    {"from": "gpt", "value": "<think>only thinking</think>"}]})


def test_tool_call_preference_pairs_in_both_forms():
    sharegpt = preference_from_record({"conversations": SHAREGPT["conversations"][:1], "tools": TOOLS,
                                       "chosen": {"from": "function_call", "value": json.dumps(CALL)},
                                       "rejected": {"from": "gpt", "value": "Yes, that is fine."}})
    openai = preference_from_record({"prompt": OPENAI["messages"][1:2], "tools": TOOLS,
                                     "chosen": [OPENAI["messages"][2]],
                                     "rejected": [{"role": "assistant", "content": "Yes, that is fine."}]})
    assert sharegpt == openai
    assert sharegpt["chosen"]["tool_calls"][0]["function"] == CALL
    with pytest.raises(ValueError, match="does not declare"):
        preference_from_record({**{k: v for k, v in OPENAI.items() if k != "messages"}, "tools": [],
                                "prompt": OPENAI["messages"][1:2], "chosen": [OPENAI["messages"][2]],
                                "rejected": "no"})


# ---------------------------------------------------------------- rendering and labels


def test_tool_capable_template_renders_tools_itself_and_trains_calls_not_results(tokenizer):
    template = qwen3(tokenizer)
    assert template.native_tools and template.call_format == "qwen"
    conversation = conversation_from_record(OPENAI)
    trained, text = trained_text(template, tokenizer, conversation, conversation.tools)
    assert "<tools>" in text and '"name": "check_drug_interaction"' in text  # the tool list in the system turn
    assert "<tool_call>" in trained and '"drug_a": "warfarin"' in trained  # the call is trained ...
    assert ANSWER in trained
    assert RESULT not in trained and "bleeding risk\"" in text  # ... the tool's result is prompt
    assert "pharmacist" not in trained and "aspirin with warfarin?" not in trained


@pytest.mark.parametrize("tool_format, call_marker, result_marker", [
    ("default", "Action: check_drug_interaction\nAction Input:", "Observation: "),
    ("qwen", "<tool_call>", "<tool_response>"),
    ("llama3", '"parameters": {"drug_a"', RESULT),
    ("mistral", "[TOOL_CALLS]", "[TOOL_RESULTS]"),
    ("glm4", "check_drug_interaction\n{", "<|observation|>"),
])
def test_template_without_tool_support_writes_calls_in_the_tool_format(tokenizer, tool_format, call_marker,
                                                                       result_marker):
    template = get_template(None, tokenizer, tool_format=tool_format)  # SmolLM2's ChatML has no tool support
    assert not template.native_tools
    conversation = conversation_from_record(SHAREGPT)
    trained, text = trained_text(template, tokenizer, conversation, conversation.tools)
    assert call_marker in trained and ANSWER in trained
    assert result_marker in text and RESULT not in trained
    assert "check_drug_interaction" in text.split("<|im_start|>user")[0]  # the tools are described in the system turn
    # what the model writes is read back as the same call
    rendered, spans = template.answer_spans(conversation, conversation.tools)
    written = rendered[spans[0][0]:spans[0][1]].split("<|im_end|>")[0]  # the first answer: the call
    calls = template.parse_response(written, ["check_drug_interaction"])["tool_calls"]
    assert calls == [{"type": "function", "function": CALL}]


@pytest.mark.parametrize("tool_format", TOOL_FORMATS)
def test_each_tool_format_reads_back_what_it_writes(tool_format):
    calls = [{"type": "function", "function": CALL},
             {"type": "function", "function": {"name": "lab_reference_range", "arguments": {"test": "potassium"}}}]
    written = "Let me check.\n" + format_calls(calls, tool_format)
    content, parsed = parse_calls(written, tool_format, ["check_drug_interaction", "lab_reference_range"])
    assert parsed == calls and content == "Let me check."
    assert parse_calls(written, tool_format, ["other_tool"])[1] == []  # undeclared names stay text


def test_reasoning_is_trained_by_default_or_kept_out_of_the_loss(tokenizer):
    template = qwen3(tokenizer)
    conversation = [{"role": "user", "content": "Fever of 38.5 C in an adult?"},
                    {"role": "assistant", "content": "Rest, fluids, and paracetamol within its daily limit.",
                     "reasoning_content": "A moderate fever without warning signs."}]
    trained, text = trained_text(template, tokenizer, conversation)
    assert "<think>\nA moderate fever without warning signs.\n</think>\n\nRest" in text
    assert "A moderate fever without warning signs." in trained and "Rest, fluids" in trained
    trained, text_again = trained_text(template, tokenizer, conversation, train_on_reasoning=False)
    assert text_again == text  # the reasoning stays in the input ...
    assert "moderate fever" not in trained and "Rest, fluids" in trained and "</think>" in trained  # ... not the loss


def test_enable_thinking_false_renders_the_non_thinking_form(tokenizer):
    template = qwen3(tokenizer, enable_thinking=False)
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A.", "reasoning_content": "R."}]
    trained, text = trained_text(template, tokenizer, conversation)
    assert "R." not in text and trained.startswith("A.")
    prompt = template.render(conversation[:1], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and text.startswith(prompt)


def test_answers_are_parsed_into_reasoning_content_and_tool_calls(tokenizer):
    template = qwen3(tokenizer)
    parsed = template.parse_response('<think>\nCheck it.\n</think>\n\nI will look it up.\n<tool_call>\n'
                                     + json.dumps(CALL) + "\n</tool_call>", ["check_drug_interaction"])
    assert parsed == {"content": "I will look it up.", "reasoning_content": "Check it.",
                      "tool_calls": [{"type": "function", "function": CALL}]}


# ---------------------------------------------------------------- end to end on the tiny model


def tool_sft_records(count: int) -> list[dict]:
    """Tool-call conversations in both forms, with some plain ones mixed in (as in one real folder)."""
    records = []
    for i in range(count):
        if i % 3 == 0:
            records.append(SHAREGPT)
        elif i % 3 == 1:
            records.append(OPENAI)
        else:
            records.append({"conversations": [{"from": "human", "value": f"Is a fever of 39 C dangerous? ({i})"},
                                              {"from": "gpt", "value": "See a doctor if it lasts over 3 days."}]})
    return records


def train_losses(output_dir) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


COMMON = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none",
          "--gradient_checkpointing", "false", "--seed", "3", "--save_strategy", "no", "--dataloader_num_workers", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("template_args", [["--tool_format", "default"], ["--template_name", "qwen3"]],
                         ids=["tool_format-default", "qwen3-native-tools"])
def test_sft_on_tool_calls_learns_and_saves_how_it_rendered_them(tiny_model_dir, tmp_path, template_args):
    import supervised_finetuning
    from medgpt.args import ModelArguments
    from medgpt.generation import ChatModel

    data = write_jsonl(tmp_path / "train" / "tools.jsonl", tool_sft_records(6))
    out = tmp_path / "sft"
    metrics = supervised_finetuning.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_files", str(data), "--output_dir", str(out),
        "--validation_split_percentage", "0", "--max_steps", "12", "--learning_rate", "1e-2", "--max_length", "512",
        *COMMON, *template_args])
    losses = train_losses(out)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses  # it learns the tool conversations
    assert metrics["train_records_kept"] == 6 and metrics["invalid_records"] == 0
    chat = ChatModel.load(ModelArguments(model_name_or_path=str(tiny_model_dir), adapter_name_or_path=str(out),
                                         tokenizer_name_or_path=str(out)))
    prompt = chat.prompt([{"role": "user", "content": "Aspirin with warfarin?"}], tools=TOOLS)
    if template_args[0] == "--tool_format":  # the saved settings bring the same tool format back at inference
        assert json.loads((out / "medgpt_chat.json").read_text()) == {"tool_format": "default"}
        assert "Action Input:" in prompt
    else:
        assert "<tools>" in prompt and chat.template.call_format == "qwen"


@pytest.mark.slow
def test_sft_with_reasoning_on_the_qwen3_template(tiny_model_dir, tmp_path):
    import supervised_finetuning

    records = [{"messages": [{"role": "user", "content": f"Fever of 38.{i} C in an adult, what to do?"},
                             {"role": "assistant", "reasoning_content": "No warning signs are mentioned.",
                              "content": "Rest and drink fluids; see a doctor if it lasts over 3 days."}]}
               for i in range(6)]
    data = write_jsonl(tmp_path / "train" / "reasoning.jsonl", records)
    for train_on_reasoning in ("true", "false"):
        out = tmp_path / f"sft-{train_on_reasoning}"
        supervised_finetuning.main([
            "--model_name_or_path", str(tiny_model_dir), "--train_files", str(data), "--output_dir", str(out),
            "--validation_split_percentage", "0", "--max_steps", "8", "--learning_rate", "1e-2",
            "--template_name", "qwen3", "--train_on_reasoning", train_on_reasoning, *COMMON])
        losses = train_losses(out)
        assert sum(losses[-3:]) < sum(losses[:3]), losses
        assert "generation" in (out / "chat_template.jinja").read_text()  # the training variant is what is saved


@pytest.mark.slow
@pytest.mark.parametrize("template_args", [["--tool_format", "default"], ["--template_name", "qwen3"]],
                         ids=["tool_format-default", "qwen3-native-tools"])
def test_dpo_on_tool_call_pairs_lowers_the_loss(tiny_model_dir, tmp_path, template_args):
    import dpo_training

    pairs = []
    for i in range(4):
        pairs.append({"conversations": [{"from": "human", "value": f"Can I take aspirin with warfarin? ({i})"}],
                      "tools": json.dumps(TOOLS), "chosen": {"from": "function_call", "value": json.dumps(CALL)},
                      "rejected": {"from": "gpt", "value": "Yes, that is fine."}})
        pairs.append({"prompt": OPENAI["messages"][:4], "tools": TOOLS,
                      "chosen": [{"role": "assistant", "content": ANSWER}],
                      "rejected": [{"role": "assistant", "content": "No interaction, take both."}]})
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "dpo"
    metrics = dpo_training.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_files", str(data), "--validation_files", str(data),
        "--output_dir", str(out), "--max_steps", "6", "--learning_rate", "1e-2", "--max_length", "1024",
        "--beta", "0.5", *COMMON, *template_args])
    # at the start the policy is its reference, so the loss is ln 2; training on these pairs must lower it
    assert metrics["eval_loss"] < 0.69, metrics["eval_loss"]
    assert metrics["eval_rewards/accuracies"] > 0.5
    assert metrics["train_pairs_kept"] == 8


@pytest.mark.slow
def test_flawed_records_are_skipped_counted_and_written_out(tiny_model_dir, tmp_path):
    import supervised_finetuning

    records = tool_sft_records(40)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines[5] = json.dumps({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "Hi."}]})
    lines[17] = json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                                              {"from": "human", "value": "And then?"}]})
    lines[30] = '{"conversations": [ broken json'
    path = tmp_path / "train" / "flawed.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["--model_name_or_path", str(tiny_model_dir), "--train_files", str(path),
              "--validation_split_percentage", "0", "--max_steps", "1", *COMMON]
    with pytest.raises(DataError) as error:  # the default: stop and list every flawed record
        supervised_finetuning.main([*common, "--output_dir", str(tmp_path / "strict")])
    assert all(f"{path}:{line}:" in str(error.value) for line in (6, 18, 31))
    out = tmp_path / "skip"
    metrics = supervised_finetuning.main([*common, "--output_dir", str(out), "--on_invalid_record", "skip",
                                          "--max_invalid_fraction", "0.1"])
    assert metrics["invalid_records"] == 3 and metrics["train_records_kept"] == 37
    dropped = [json.loads(line) for line in (out / "invalid_records.jsonl").read_text().splitlines()]
    assert [d["source"] for d in dropped] == [f"{path}:6", f"{path}:18", f"{path}:31"]
    assert "is empty" in dropped[0]["reason"] and "no assistant reply at the end" in dropped[1]["reason"]
    assert dropped[1]["record"]["conversations"][2]["value"] == "And then?"  # the record itself, to fix and re-add
    assert dropped[2]["record"] == '{"conversations": [ broken json'
    with pytest.raises(DataError, match=r"3 of 40 records \(7.5%\) are invalid, more than --max_invalid_fraction 0.05"):
        supervised_finetuning.main([*common, "--output_dir", str(tmp_path / "too-many"), "--on_invalid_record", "skip"])


def test_validate_skip_writes_the_clean_records_and_the_invalid_ones(tmp_path):
    from conftest import run_script

    lines = [json.dumps(SHAREGPT), '{"conversations": [', json.dumps(OPENAI),
             json.dumps({"conversations": [{"from": "human", "value": "q"}]})]
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    strict = run_script("-m", "medgpt.data_tools", "validate", "--inputs", str(source), check=False)
    assert strict.returncode == 1 and f"{source}:2:" in strict.stderr and f"{source}:4:" in strict.stderr
    clean = tmp_path / "clean.jsonl"
    run_script("-m", "medgpt.data_tools", "validate", "--inputs", str(source), "--on_invalid_record", "skip",
               "--output", str(clean))
    assert [json.loads(line) for line in clean.read_text().splitlines()] == [SHAREGPT, OPENAI]
    rejected = [json.loads(line) for line in (tmp_path / "clean.invalid_records.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rejected] == [f"{source}:2", f"{source}:4"]
    assert rejected[0]["record"] == '{"conversations": [' and "no assistant reply" in rejected[1]["reason"]


@pytest.mark.parametrize("template_file, settings, expected", [
    ("qwen3.jinja", None, ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]),
    ("deepseek_r1_distill.jinja", None, ["--reasoning-parser", "deepseek_r1"]),
    ("llama3_1.jinja", None, ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]),
    ("llama3.jinja", {"tool_format": "mistral"}, ["--enable-auto-tool-choice", "--tool-call-parser", "mistral"]),
    ("llama3.jinja", {"tool_format": "default"}, []),
])
def test_vllm_gets_the_parsers_for_how_the_model_writes_calls_and_reasoning(tmp_path, template_file, settings,
                                                                           expected):
    import trl

    from medgpt.vllm_cli import parser_flags

    template = (__import__("pathlib").Path(trl.__file__).parent / "chat_templates" / template_file).read_text()
    (tmp_path / "chat_template.jinja").write_text(template)
    if settings:
        (tmp_path / "medgpt_chat.json").write_text(json.dumps(settings))
    assert parser_flags(str(tmp_path)) == expected
