"""Batched answering: the API's dynamic batching gives every request its one-at-a-time greedy answer, and
inference.py under torchrun answers every question once, in input order, as one process does."""

import concurrent.futures
import json
import os
import subprocess
import sys
import types

import pytest

from conftest import ROOT

QUESTIONS = ["What is a fever?", "How is asthma treated?", "什么是高血压？", "Can I take ibuprofen with warfarin?",
             "What are the warning signs of a stroke?", "Is a cold caused by a virus?"]


@pytest.fixture(scope="module")
def embedded_chat(default_model_dir):
    from medgpt.args import ModelArguments
    from medgpt.generation import ChatModel

    return ChatModel.load(ModelArguments(model_name_or_path=str(default_model_dir)))


@pytest.fixture(scope="module")
def tiny_chat(tiny_model_dir):
    from medgpt.args import ModelArguments
    from medgpt.generation import ChatModel

    return ChatModel.load(ModelArguments(model_name_or_path=str(tiny_model_dir)))


def sse_answer(text: str) -> tuple[str, str]:
    """The content and finish reason of a streamed answer (server-sent events)."""
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return content, [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]


@pytest.mark.parametrize("model", ["embedded"])  # the tiny model answers newlines only: nothing to compare
def test_batched_api_answers_equal_one_at_a_time_greedy_answers(model, request):
    """Five greedy requests (own max_tokens, one with a stop string, one streamed) sent at once are answered in
    one batch, each exactly as the model answers it alone; a sampled request is batched apart."""
    from fastapi.testclient import TestClient

    import openai_api
    from medgpt.generation import GenerationArguments

    chat = request.getfixturevalue(f"{model}_chat")
    asks = [{"question": QUESTIONS[0], "max_tokens": 10, "stop": [" response", "。"]},
            {"question": QUESTIONS[1], "max_tokens": 4}, {"question": QUESTIONS[2], "max_tokens": 8},
            {"question": QUESTIONS[3], "max_tokens": 6, "stream": True}, {"question": QUESTIONS[4], "max_tokens": 8}]
    alone = [chat.complete([[{"role": "user", "content": ask["question"]}]],
                           GenerationArguments(max_new_tokens=ask["max_tokens"], temperature=0, top_p=1, top_k=0,
                                               repetition_penalty=1.0), stop=ask.get("stop", ()))[0] for ask in asks]

    def body(ask, temperature=0):
        return {"messages": [{"role": "user", "content": ask["question"]}], "max_tokens": ask["max_tokens"],
                "temperature": temperature, "stop": ask.get("stop"), "stream": ask.get("stream", False)}

    app = openai_api.create_app(chat, openai_api.ServerArguments(max_batch_size=len(asks), batch_window_ms=500))
    with TestClient(app) as http, concurrent.futures.ThreadPoolExecutor(len(asks) + 1) as pool:
        sampled = pool.submit(http.post, "/v1/chat/completions", json=body({"question": QUESTIONS[5], "max_tokens": 2}, 0.8))
        replies = list(pool.map(lambda ask: http.post("/v1/chat/completions", json=body(ask)), asks))
        assert sampled.result().status_code == 200
    assert app.state.batcher.batch_sizes == {len(asks): 1, 1: 1}  # the greedy requests in one batch, sampling apart
    for ask, reply, expected in zip(asks, replies, alone):
        assert reply.status_code == 200, reply.text
        if ask.get("stream"):
            content, finish = sse_answer(reply.text)
            assert (content.strip(), finish) == (expected.text, expected.finish_reason)
            continue
        choice, usage = reply.json()["choices"][0], reply.json()["usage"]
        assert choice["message"]["content"] == expected.text
        assert (choice["finish_reason"], usage["completion_tokens"], usage["prompt_tokens"]) == \
            (expected.finish_reason, expected.completion_tokens, expected.prompt_tokens)
    if model == "embedded":  # real answers: their own lengths and stop strings were honoured
        assert [a.completion_tokens for a in alone[1:]] == [4, 8, 6, 8]
        assert alone[0].finish_reason == "stop" and alone[0].completion_tokens < 10
        assert alone[0].text == "A fever is a natural bodily"


def test_torchrun_two_processes_answer_every_question_once_in_input_order(default_model_dir, embedded_chat, tmp_path):
    """2 processes (gloo) answer 6 questions: rank 0 writes each answer once, in input order, the same as one
    process writes; no part file is left behind."""
    from inference import InferenceArguments, run_batch
    from medgpt.generation import GenerationArguments

    questions = tmp_path / "questions.txt"
    questions.write_text("".join(q + "\n" for q in QUESTIONS), encoding="utf-8")
    common = ["--base_model", str(default_model_dir), "--data_file", str(questions), "--temperature", "0",
              "--max_new_tokens", "6", "--batch_size", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "inference.py",
         *common, "--output_file", str(tmp_path / "two.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Wrote 6 answers" in result.stdout and "(2 processes)" in result.stdout
    run_batch(embedded_chat, InferenceArguments(data_file=str(questions), output_file=str(tmp_path / "one.jsonl"),
                                                batch_size=2), GenerationArguments(max_new_tokens=6, temperature=0))
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["question"] for row in two] == QUESTIONS
    assert all(row["answer"] for row in two)
    assert (tmp_path / "two.jsonl").read_text(encoding="utf-8") == (tmp_path / "one.jsonl").read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "questions.txt", "two.jsonl"]


def test_merge_puts_parts_back_in_input_order_and_refuses_a_short_part(tmp_path):
    from inference import merge_parts, part_path

    output = tmp_path / "answers.jsonl"
    for rank in range(3):  # 7 questions over 3 processes: ranks 0, 1, 2 hold 3, 2, 2 answers
        part_path(output, rank, 3).write_text("".join(f"{i}\n" for i in range(rank, 7, 3)))
    merge_parts(output, 3, 7)
    assert output.read_text() == "".join(f"{i}\n" for i in range(7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]
    for rank, lines in enumerate(["0\n3\n6\n", "1\n", "2\n5\n"]):  # rank 1 stopped early
        part_path(output, rank, 3).write_text(lines)
    with pytest.raises(RuntimeError, match="no answer for question 5"):
        merge_parts(output, 3, 7)
    assert output.read_text() == "".join(f"{i}\n" for i in range(7))  # the earlier output is untouched


def test_vllm_tensor_parallel_size_reaches_the_engine(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import inference

    engine = {}

    class LLM:
        def __init__(self, **kwargs):
            engine.update(kwargs)

        def generate(self, prompts, sampling, lora_request=None):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" answer {len(prompt['prompt_token_ids'])} ")])
                    for prompt in prompts]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, dict
    lora_request = types.ModuleType("vllm.lora.request")
    lora_request.LoRARequest = None
    for name, module in (("vllm", vllm), ("vllm.lora", types.ModuleType("vllm.lora")),
                         ("vllm.lora.request", lora_request)):
        monkeypatch.setitem(sys.modules, name, module)
    questions = tmp_path / "q.txt"
    questions.write_text("What is a fever?\nWhat is HbA1c?\n", encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    inference.main(["--vllm", "--tensor_parallel_size", "2", "--base_model", str(tiny_model_dir),
                    "--data_file", str(questions), "--output_file", str(output)])
    assert engine["tensor_parallel_size"] == 2
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["question"] for row in rows] == ["What is a fever?", "What is HbA1c?"]
    assert all(row["answer"].startswith("answer ") for row in rows)

    with pytest.raises(SystemExit):
        inference.main(["--help"])
    assert "--tensor_parallel_size" in capsys.readouterr().out
    for argv, message in ((["--vllm", "--tensor_parallel_size", "0"], "--tensor_parallel_size 0: must be at least 1"),
                          (["--tensor_parallel_size", "2"], "is for --vllm"),
                          (["--vllm", "--vllm_memory_utilization", "1.5"], "--vllm_memory_utilization 1.5")):
        with pytest.raises(SystemExit, match=message):
            inference.main([*argv, "--data_file", str(questions)])


@pytest.mark.parametrize("flag, value", [("--max_batch_size", "0"), ("--batch_window_ms", "-1")])
def test_bad_batching_flags_are_named(flag, value):
    import openai_api

    with pytest.raises(SystemExit, match=f"{flag} {value}"):
        openai_api.main([flag, value])


def test_a_bad_question_file_is_reported_whole_before_the_model_loads(tmp_path, monkeypatch):
    import inference
    from medgpt.records import DataError

    monkeypatch.setattr(inference.ChatModel, "load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "What is a fever?"}\n{not json\n{"foo": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"(?s)2 problem.*q.jsonl:2: not valid JSON.*q.jsonl:3: matches no known"):
        inference.main(["--data_file", str(questions), "--output_file", str(tmp_path / "answers.jsonl")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]
