"""The data reader: every bad-input kind is reported with file and line, all at once; formats convert."""

import pytest

from conftest import raw_dataset, write_jsonl
from medgpt.args import DataArguments
from medgpt.data_files import find_data_files, json_reader, load_train_validation
from medgpt.records import DataError, conversation_from_record, record_to_messages
from medgpt.tokenization import build_sft_dataset
from template import get_template


def load(tmp_path, **kwargs):
    args = DataArguments(train_file_dir=str(tmp_path / "train"), validation_split_percentage=0, **kwargs)
    return load_train_validation(args, json_reader(conversation_from_record), "SFT data", seed=0)


def write_lines(path, lines, raw=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines) if raw else "".join(line + "\n" for line in lines).encode())
    return path


GOOD = '{"question": "q", "answer": "a"}'


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "q", "answer": ', "not valid JSON"),
        ('{"title": "no known keys"}', "matches no known format"),
        ('{"question": "q"}', "has 'question' but no 'answer'"),
        ('{"instruction": "q"}', "Alpaca record has no 'output'"),
        ('{"conversations": [{"from": "doctor", "value": "hi"}]}', "unknown role 'doctor'"),
        ('{"conversations": [{"from": "human", "value": "hi"}]}', "no assistant reply"),
        ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}', "roles out of order"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]}', "roles out of order"),
        ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}', "is empty"),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_bad_record_names_file_line_and_problem(tmp_path, line, message):
    path = write_lines(tmp_path / "train" / "bad.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as error:
        load(tmp_path)
    assert f"{path}:2:" in str(error.value)
    assert message in str(error.value)


def test_non_utf8_line_is_reported(tmp_path):
    path = write_lines(tmp_path / "train" / "latin1.jsonl", [GOOD.encode() + b"\n", '{"question": "caf\xe9", "answer": "a"}\n'.encode("latin-1")], raw=True)
    with pytest.raises(DataError) as error:
        load(tmp_path)
    assert f"{path}:2: not UTF-8" in str(error.value)


def test_empty_file_and_missing_folder(tmp_path):
    write_lines(tmp_path / "train" / "empty.jsonl", [])
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        load(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        find_data_files(str(tmp_path / "nowhere"), None, (".jsonl",), "train")
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no .jsonl/.json files found"):
        find_data_files(str(tmp_path / "only_text"), None, (".jsonl", ".json"), "train")


def test_no_training_data_given():
    with pytest.raises(DataError, match="--train_file_dir"):
        load_train_validation(DataArguments(), json_reader(conversation_from_record), "SFT data", seed=0)


def test_every_problem_is_reported_at_once(tmp_path):
    write_lines(tmp_path / "train" / "a.jsonl", ["{bad", GOOD, '{"x": 1}'])
    write_lines(tmp_path / "train" / "sub" / "b.jsonl", [GOOD, '{"conversations": [{"from": "gpt", "value": "a"}]}'])
    with pytest.raises(DataError) as error:
        load(tmp_path)
    assert len(error.value.problems) == 3
    text = str(error.value)
    assert "a.jsonl:1:" in text and "a.jsonl:3:" in text and "b.jsonl:2:" in text


def test_json_array_files_are_read(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "set.json").write_text('[{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]')
    train, validation = load(tmp_path)
    assert [messages[-1]["content"] for _, messages in train] == ["a1", "a2"] and validation == []


def test_formats_convert_to_the_same_messages():
    expected = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2\nextra"},
        {"role": "assistant", "content": "A2"},
    ]
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                                  {"from": "gpt", "value": "A1"}, {"from": "user", "value": "Q2\nextra"},
                                  {"from": "assistant", "value": "A2"}]}
    openai = {"messages": expected}
    alpaca = {"system": "S", "history": [["Q1", "A1"]], "instruction": "Q2", "input": "extra", "output": "A2"}
    for record in (sharegpt, openai, alpaca):
        assert record_to_messages(record) == expected
    assert record_to_messages({"问": "Q", "答": "A"}) == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_validation_split_is_held_out_and_seeded(tmp_path):
    write_jsonl(tmp_path / "train" / "d.jsonl", [{"question": f"q{i}", "answer": "a"} for i in range(40)])
    args = DataArguments(train_file_dir=str(tmp_path / "train"), validation_split_percentage=10)
    train, validation = load_train_validation(args, json_reader(conversation_from_record), "SFT data", seed=3)
    again = load_train_validation(args, json_reader(conversation_from_record), "SFT data", seed=3)
    assert len(validation) == 4 and len(train) == 36
    assert {s for s, _ in validation}.isdisjoint({s for s, _ in train})
    assert [s for s, _ in validation] == [s for s, _ in again[1]]


def long_conversation(turn_words: int, turns: int) -> list[dict]:
    messages = []
    for index in range(turns):
        messages.append({"role": "user", "content": f"question {index} " + "word " * turn_words})
        messages.append({"role": "assistant", "content": f"answer {index} " + "word " * turn_words})
    return messages


def test_overlong_conversations_are_cut_at_turn_boundaries(tokenizer, tmp_path):
    template = get_template(None, tokenizer)
    records = raw_dataset(tmp_path / "a.jsonl", [{"messages": m} for m in (
        long_conversation(40, 4), long_conversation(10, 1), long_conversation(200, 1))])
    dataset, counts = build_sft_dataset(records, tokenizer, template, max_length=200, overlong_policy="skip")
    assert counts == {"kept": 1, "cut": 1, "truncated": 0, "skipped": 1, "invalid": 0}
    assert len(dataset) == 2
    for row in dataset:
        assert len(row["input_ids"]) <= 200
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        # the last trained token of every row is an end-of-turn (or the newline after it)
        tail = tokenizer.decode(trained[-2:])
        assert tokenizer.eos_token in tail

    dataset, counts = build_sft_dataset(records, tokenizer, template, max_length=200, overlong_policy="truncate")
    assert counts == {"kept": 1, "cut": 1, "truncated": 1, "skipped": 0, "invalid": 0}
    assert len(dataset) == 3 and max(len(r) for r in dataset["input_ids"]) == 200


def test_top_level_system_and_question_answer_history_are_kept_not_dropped():
    sharegpt = {"system": "You are a careful triage nurse.",
                "conversations": [{"from": "human", "value": "Chest pain at rest?"},
                                  {"from": "gpt", "value": "Call your emergency number now."}]}
    assert [m["role"] for m in conversation_from_record(sharegpt)] == ["system", "user", "assistant"]
    assert conversation_from_record(sharegpt)[0]["content"] == "You are a careful triage nurse."
    qa = {"question": "And if it passes?", "answer": "Still get checked today.",
          "history": [["Chest pain at rest?", "Call your emergency number now."]]}
    assert [m["content"] for m in conversation_from_record(qa)] == [
        "Chest pain at rest?", "Call your emergency number now.", "And if it passes?", "Still get checked today."]
    twice = {**sharegpt, "conversations": [{"from": "system", "value": "x"}, *sharegpt["conversations"]]}
    with pytest.raises(ValueError, match="top-level 'system' and a system turn"):
        conversation_from_record(twice)
    with pytest.raises(ValueError, match="has both 'conversations' and 'instruction'"):
        conversation_from_record({**sharegpt, "instruction": "Hi", "output": "Hello"})


def read_both_ways(tmp_path, tokenizer, path):
    """The problems of a file as the list reader (data tools, evaluation) and as training (Arrow rows, skip policy)
    report them, and the sources each kept."""
    from medgpt.data_files import InvalidRecords, raw_records, read_json_records

    problems = []
    listed = [record.source for record in read_json_records([path], problems)]
    invalid = InvalidRecords("skip", max_fraction=1.0, output_dir=str(tmp_path / "out"))
    try:
        build_sft_dataset(raw_records([path]), tokenizer, get_template(None, tokenizer), 128, "skip", invalid=invalid)
    except DataError:  # a problem of a whole file stops under any policy
        pass
    return problems, listed, [str(p) for p in invalid.dropped], invalid


@pytest.mark.parametrize("line, message", [
    ('{"a":' * 100000, "nested too deeply"),
    ('{"instruction": "a", "instruction": "b", "output": "c"}', 'the key "instruction" appears more than once'),
    ('{"messages": [{"role": "user", "content": "q", "content": "r"}, {"role": "assistant", "content": "a"}]}',
     'the key "content" appears more than once'),
])
def test_deep_nesting_and_repeated_keys_are_bad_records_in_every_reader(tmp_path, tokenizer, line, message):
    path = write_lines(tmp_path / "train" / "bad.jsonl", [GOOD, line, GOOD])
    problems, listed, dropped, invalid = read_both_ways(tmp_path, tokenizer, path)
    assert listed == [f"{path}:1", f"{path}:3"]
    assert [p[: len(f"{path}:2: {message}")] for p in problems] == [f"{path}:2: {message}"]
    assert [p[: len(f"{path}:2: {message}")] for p in dropped] == [f"{path}:2: {message}"]
    assert invalid.finish("SFT data") == {"invalid_records": 1}  # skipped and counted, the others kept
    with pytest.raises(DataError, match=f"{path}:2: {message}"):
        load(tmp_path)

    array = tmp_path / "array" / "set.json"
    array.parent.mkdir()
    array.write_text(f"[{GOOD},\n {line},\n {GOOD}]", encoding="utf-8")
    problems, listed, dropped, _ = read_both_ways(tmp_path, tokenizer, array)
    if "nested" in message:  # too deep to follow: the rest of the array cannot be read, a problem of the file
        assert listed == [f"{array}[0]"] and problems == dropped
        assert [p[: len(f"{array}:2: {message}")] for p in problems] == [f"{array}:2: {message}"]
    else:  # one bad element, the others read
        assert listed == [f"{array}[0]", f"{array}[2]"] and problems == dropped
        assert [p[: len(f"{array}[1]: {message}")] for p in problems] == [f"{array}[1]: {message}"]


def test_a_utf16_file_is_one_clear_problem_not_one_per_line(tmp_path, tokenizer):
    from medgpt.data_files import raw_records

    for name in ("train.jsonl", "notes.txt"):
        path = tmp_path / "utf16" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(f"{GOOD}\n{GOOD}\n".encode("utf-16"))
        assert raw_records([path])["problem"] == [
            f"{path}: the file is UTF-16 text (it starts with a UTF-16 byte order mark); data files must be UTF-8. "
            f"Convert it, e.g. iconv -f UTF-16 -t UTF-8 {path} > {path.with_name(path.stem + '.utf8' + path.suffix)}"]
    problems, listed, dropped, _ = read_both_ways(tmp_path, tokenizer, tmp_path / "utf16" / "train.jsonl")
    assert len(problems) == 1 and listed == [] and dropped == problems


def test_a_utf8_byte_order_mark_is_read(tmp_path, tokenizer):
    import codecs

    for name, text in [("lines.jsonl", f"{GOOD}\n{GOOD}\n"), ("array.json", f"[{GOOD},\n{GOOD}]\n")]:
        path = tmp_path / "bom" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(codecs.BOM_UTF8 + text.encode())
        problems, listed, dropped, _ = read_both_ways(tmp_path, tokenizer, path)
        assert problems == [] and dropped == [] and len(listed) == 2, (name, problems)


def test_a_json_file_holding_one_object_is_one_problem_naming_its_list(tmp_path, tokenizer):
    import json

    wrapped = tmp_path / "wrapped" / "set.json"
    wrapped.parent.mkdir()
    wrapped.write_text(json.dumps({"version": 2, "data": [json.loads(GOOD)] * 3}, indent=2), encoding="utf-8")
    problems, listed, dropped, _ = read_both_ways(tmp_path, tokenizer, wrapped)
    assert listed == [] and dropped == problems and problems == [
        f"{wrapped}: the file holds one JSON object, not records: records must be a top-level list [{{...}}, {{...}}] "
        f"or JSON lines (one object a line). Its key \"data\" holds a list: if that list is the records, make it the "
        f"whole file, e.g. jq '.[\"data\"]' {wrapped} > {wrapped.with_name('set.records.json')}"]
