"""Standard benchmarks from their published files: every reader, few-shot prompts, problems with file:line,
and one scoring run of evaluate_model.py on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.benchmarks import (
    accuracy_summary,
    benchmark_question,
    detect_format,
    fewshot_examples,
    find_fewshot_file,
    read_benchmark,
    read_benchmark_file,
    wilson_interval,
)
from medgpt.records import DataError

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "benchmarks"


@pytest.mark.parametrize("name, fmt, answers, subjects", [
    ("medqa/test.jsonl", "medqa", ["C", "A", "B", "D", "A"], {None}),
    ("medmcqa/dev.json", "medmcqa", ["B", "A", "C", "D", "B"], {"Anatomy", "Pharmacology", "Pediatrics", "Physiology"}),
    ("pubmedqa/test_set.json", "pubmedqa", ["A", "B", "C", "A"], {None}),
    ("cmexam/test.csv", "cmexam", ["C", "B", "A", "ABC", "A"], {None}),
    ("cmb/CMB-val-merge.json", "cmb", ["B", "A", "ABC", "C", "ABD"], {"医师考试", "护理考试"}),
    ("ceval/val", "ceval", ["B", "A", "C", "B", "A"], {"clinical_medicine", "physician"}),
    ("cmmlu/test", "cmmlu", ["B", "A", "C", "A", "B"], {"clinical_knowledge", "nutrition"}),
    ("mmlu/test", "mmlu", ["D", "A", "B", "C", "A"], {"anatomy", "clinical_knowledge"}),
])
def test_every_shipped_format_is_detected_and_read(name, fmt, answers, subjects):
    benchmark = read_benchmark(str(SAMPLES / name))
    assert benchmark["format"] == fmt
    assert [item["answer"] for item in benchmark["items"]] == answers
    assert {item["subject"] for item in benchmark["items"]} == subjects
    for item in benchmark["items"]:
        assert set(item["answer"]) <= set(item["options"]) and item["question"]


def test_options_and_answers_map_to_the_right_letters():
    medmcqa = read_benchmark(str(SAMPLES / "medmcqa/dev.json"))["items"][0]  # cop 2 -> opb
    assert medmcqa["answer"] == "B" and medmcqa["options"]["B"] == "Axillary nerve"
    pubmed = read_benchmark(str(SAMPLES / "pubmedqa/test_set.json"))["items"]
    assert pubmed[2]["options"] == {"A": "yes", "B": "no", "C": "maybe"} and pubmed[2]["answer"] == "C"
    assert "Context:" in pubmed[0]["question"] and pubmed[0]["question"].endswith("intermittent claudication?")
    cmexam = read_benchmark(str(SAMPLES / "cmexam/test.csv"))["items"][2]
    assert cmexam["options"]["A"] == "肾上腺素" and len(cmexam["options"]) == 5 and cmexam["answer"] == "A"
    ceval = read_benchmark(str(SAMPLES / "ceval/val"))["items"][0]
    assert ceval["options"]["B"] == "36.0～37.0℃" and ceval["source"].endswith("clinical_medicine_val.csv:2")
    mmlu = read_benchmark(str(SAMPLES / "mmlu/test"))
    assert mmlu["items"][0]["options"]["D"] == "Left ventricle" and mmlu["items"][0]["source"].endswith(":1")
    assert mmlu["name"] == "mmlu/test" and read_benchmark(str(SAMPLES / "cmb/CMB-val-merge.json"))["name"] == \
        "CMB-val-merge"


def test_medmcqa_cop_is_one_based_unless_the_file_has_a_zero(tmp_path):
    row = {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}
    one_based = tmp_path / "one.json"
    one_based.write_text(json.dumps({**row, "cop": 1}) + "\n" + json.dumps({**row, "cop": 4}) + "\n")
    assert [i["answer"] for i in read_benchmark_file(one_based)[1]] == ["A", "D"]
    zero_based = tmp_path / "zero.json"
    zero_based.write_text(json.dumps({**row, "cop": 0}) + "\n" + json.dumps({**row, "cop": 3}) + "\n")
    assert [i["answer"] for i in read_benchmark_file(zero_based)[1]] == ["A", "D"]


def test_multi_answer_items_score_by_exact_set():
    from medgpt.evaluation import answer_after_reasoning
    from medgpt.rewards import extract_choice

    question = benchmark_question(read_benchmark(str(SAMPLES / "cmb/CMB-val-merge.json"))["items"][4])
    assert question["answer"] == "ABD" and question["letters"] == "ABCDE" and question["kind"] == "choice"
    reasoning = "<think>A is wrong? No, 答案：C</think>\n答案：A、B、D"
    assert extract_choice(answer_after_reasoning(reasoning), question["letters"]) == question["answer"]
    assert extract_choice(answer_after_reasoning("答案：A、B"), question["letters"]) != question["answer"]
    assert answer_after_reasoning("<think>never closed, 答案：A") == ""


def test_fewshot_prompts_come_from_the_dev_split():
    assert find_fewshot_file(SAMPLES / "medqa/test.jsonl") == SAMPLES / "medqa/dev.jsonl"
    assert find_fewshot_file(SAMPLES / "mmlu/test/anatomy_test.csv") == SAMPLES / "mmlu/dev/anatomy_dev.csv"
    assert find_fewshot_file(SAMPLES / "cmmlu/test/nutrition.csv") == SAMPLES / "cmmlu/dev/nutrition.csv"
    assert find_fewshot_file(SAMPLES / "cmexam/test.csv") == SAMPLES / "cmexam/val.csv"
    assert find_fewshot_file(SAMPLES / "medmcqa/dev.json") == SAMPLES / "medmcqa/train.json"
    ceval = read_benchmark(str(SAMPLES / "ceval/val"))
    shots = fewshot_examples(ceval, 2)
    first = ceval["items"][0]
    question = benchmark_question(first, shots[first["file"]])
    roles = [turn["role"] for turn in question["prompt"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert question["prompt"][0]["content"].startswith("维生素K缺乏时")  # the clinical_medicine dev split, in order
    assert [turn["content"] for turn in question["prompt"][1::2]] == ["答案：A", "答案：A"]
    assert question["prompt"][-1]["content"].startswith("正常成人腋温") and "B. 36.0～37.0℃" in question["prompt"][-1]["content"]
    physician = next(item for item in ceval["items"] if item["subject"] == "physician")
    assert len(shots[physician["file"]]) == 1  # its dev file has one item
    english = benchmark_question(read_benchmark(str(SAMPLES / "medqa/test.jsonl"))["items"][0],
                                 fewshot_examples(read_benchmark(str(SAMPLES / "medqa/test.jsonl")), 1)[
                                     SAMPLES / "medqa/test.jsonl"])
    assert english["prompt"][1] == {"role": "assistant", "content": "Answer: A"}
    with pytest.raises(DataError, match="--num_fewshot 1: no dev split found for .*test_set.json"):
        fewshot_examples(read_benchmark(str(SAMPLES / "pubmedqa/test_set.json")), 1)


def test_bad_files_are_reported_with_file_and_line(tmp_path):
    medqa = tmp_path / "medqa.jsonl"
    good = {"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}
    medqa.write_text("\n".join([json.dumps(good), json.dumps({**good, "answer_idx": "E"}), "{not json",
                                json.dumps({k: v for k, v in good.items() if k != "options"} | {"options": "x"})]) + "\n")
    with pytest.raises(DataError) as error:
        read_benchmark_file(medqa)
    assert len(error.value.problems) == 3
    assert f"{medqa}:2: 'answer_idx' 'E' is not among the option letters A, B" in str(error.value)
    assert f"{medqa}:3:" in str(error.value) and f"{medqa}:4: 'options' must be an object" in str(error.value)
    ceval = tmp_path / "anatomy_val.csv"
    ceval.write_text('id,question,A,B,C,D,answer\n0,"a question\nover two lines",w,x,y,z,B\n1,q,w,x,y,z,F\n2,q,w\n',
                     encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_benchmark_file(ceval)
    assert [p.split(": ", 1)[0] for p in error.value.problems] == [f"{ceval}:4", f"{ceval}:5"]
    unknown = tmp_path / "notes.jsonl"
    unknown.write_text(json.dumps({"text": "hello"}) + "\n")
    assert detect_format(unknown) is None
    with pytest.raises(DataError, match=r"not a benchmark format.*medqa \(question, options, answer_idx\).*"
                                        r"--benchmark_format NAME"):
        read_benchmark(str(unknown))
    with pytest.raises(DataError, match=f"{unknown}:1: has no 'question'"):  # forced format: the rows say why
        read_benchmark_file(unknown, "cmb")


def test_wilson_interval_and_subjects():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    summary = accuracy_summary([1.0, 0.0, 1.0], ["a", "b", "a"])
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["subjects"]["a"]["n"] == 2
    assert summary["subjects"]["b"] == {"accuracy": 0.0, "n": 1, "correct": 0, "ci95": wilson_interval(0, 1)}


def test_evaluate_model_scores_benchmarks_on_the_tiny_model(tiny_model_dir, tmp_path):
    import evaluate_model
    from medgpt.args import ModelArguments
    from medgpt.evaluation import choice_loglik_predictions
    from medgpt.generation import ChatModel

    output = tmp_path / "eval"
    results = evaluate_model.main([
        "--models", f"tiny={tiny_model_dir}", "--benchmark_files", str(SAMPLES / "cmexam/test.csv"),
        str(SAMPLES / "mmlu/test"), "--num_fewshot", "1", "--benchmark_scoring", "likelihood", "generation",
        "--max_new_tokens", "4", "--batch_size", "4", "--output_dir", str(output)])
    written = json.loads((output / "benchmarks.json").read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(results))
    assert set(written["tiny"]) == {"cmexam/test", "mmlu/test"}
    for name, n in (("cmexam/test", 5), ("mmlu/test", 5)):
        entry = written["tiny"][name]
        assert entry["n"] == n and entry["scoring"] == "likelihood" and entry["num_fewshot"] == 1
        for scored in (entry, entry["generation"]):
            assert 0 <= scored["accuracy"] <= 1 and scored["accuracy"] == scored["correct"] / n
            assert scored["ci95"][0] <= scored["accuracy"] <= scored["ci95"][1]
    assert written["tiny"]["cmexam/test"]["format"] == "cmexam" and written["tiny"]["cmexam/test"]["subjects"] == {}
    subjects = written["tiny"]["mmlu/test"]["subjects"]
    assert {k: v["n"] for k, v in subjects.items()} == {"anatomy": 3, "clinical_knowledge": 2}
    table = (output / "benchmarks.md").read_text(encoding="utf-8")
    assert "| tiny |" in table and "mmlu/test by subject" in table and not (output / "results.json").exists()

    # batched likelihoods choose what one item at a time chooses (multi-answer items included)
    chat = ChatModel.load(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    questions = [benchmark_question(item) for item in read_benchmark(str(SAMPLES / "cmexam/test.csv"))["items"]]
    assert choice_loglik_predictions(chat, questions, batch_size=4) == choice_loglik_predictions(chat, questions, 1)
