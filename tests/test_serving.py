"""Serving for real: the OpenAI-compatible API with the official client, and the web demo in Chromium."""

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(script: str, *args: str, ready_url: str, timeout: float = 180) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{script} exited early:\n{process.stdout.read()[-4000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code < 500:
                return process
        except httpx.HTTPError:
            time.sleep(1)
    process.kill()
    raise AssertionError(f"{script} did not come up in {timeout}s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def api(tiny_model_dir):
    port = free_port()
    process = start("openai_api.py", "--base_model", str(tiny_model_dir), "--port", str(port), "--api_key", "test-key",
                    "--max_input_tokens", "256", "--max_tokens_limit", "64", ready_url=f"http://127.0.0.1:{port}/health")
    yield f"http://127.0.0.1:{port}/v1"
    stop(process)


def client(base_url, key="test-key"):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


QUESTION = [{"role": "user", "content": "What is a fever?"}]


def test_models_and_plain_completion(api):
    c = client(api)
    assert [m.id for m in c.models.list().data] == ["medgpt"]
    reply = c.chat.completions.create(model="medgpt", messages=QUESTION, max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")
    again = c.chat.completions.create(model="medgpt", messages=QUESTION, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == reply.choices[0].message.content  # greedy is deterministic


def test_streamed_completion_matches_chunk_format(api):
    c = client(api)
    stream = c.chat.completions.create(model="medgpt", messages=QUESTION, max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    content = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    plain = c.chat.completions.create(model="medgpt", messages=QUESTION, max_tokens=6, temperature=0)
    assert "".join(content).strip() == plain.choices[0].message.content
    raw = httpx.post(f"{api}/chat/completions", headers={"Authorization": "Bearer test-key"}, timeout=60,
                     json={"messages": QUESTION, "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_wrong_key_gets_401(api):
    import openai

    with pytest.raises(openai.AuthenticationError) as error:
        client(api, key="wrong").chat.completions.create(model="medgpt", messages=QUESTION, max_tokens=3)
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{api}/models").status_code == 401


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "doctor", "content": "x"}]}, "messages[0].role"),
    ({"messages": QUESTION, "n": 2}, "n"),
    ({"messages": QUESTION, "max_tokens": 5000}, "max_tokens"),
    ({"messages": QUESTION, "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 4}, "messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "max_tokens": 4}, "messages"),
])
def test_bad_requests_get_400_with_openai_error_body(api, body, param):
    response = httpx.post(f"{api}/chat/completions", json=body, headers={"Authorization": "Bearer test-key"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_malformed_json_is_400_not_500(api):
    response = httpx.post(f"{api}/chat/completions", content=b"{not json", timeout=30,
                          headers={"Authorization": "Bearer test-key", "Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


KEY = {"Authorization": "Bearer test-key"}
ASSISTANT = {"role": "assistant", "content": "a"}


IMAGE = {"type": "image_url", "image_url": {"url": "https://x.test/rash.png"}}
SYSTEM = {"role": "system", "content": "s"}


@pytest.mark.parametrize("fields, param, message", [
    # unknown fields, and OpenAI's fields this server does not implement
    pytest.param({"max_token": 5}, "max_token", "Unrecognized request argument supplied: max_token", id="typo"),
    pytest.param({"messages": [{"role": "user", "content": "q", "images": []}]}, "messages[0].images",
                 "Unrecognized request argument supplied: messages[0].images", id="unknown message field"),
    pytest.param({"stream": True, "stream_options": {"include_usage": True, "chunk_size": 4}},
                 "stream_options.chunk_size", "Unrecognized request argument supplied: stream_options.chunk_size",
                 id="unknown stream option"),
    pytest.param({"response_format": {"type": "json_object"}}, "response_format",
                 "response_format is not supported by this server", id="response_format"),
    pytest.param({"logprobs": True, "top_logprobs": 2}, "logprobs",
                 "logprobs is not supported by this server; top_logprobs is not supported by this server",
                 id="logprobs"),
    pytest.param({"parallel_tool_calls": False}, "parallel_tool_calls",
                 "parallel_tool_calls is not supported by this server", id="parallel_tool_calls false"),
    pytest.param({"messages": [*QUESTION, {**ASSISTANT, "audio": {"id": "a1"}}, *QUESTION]}, "messages[1].audio",
                 "messages[1].audio is not supported by this server", id="assistant audio"),
    # turns out of order, with the position
    pytest.param({"messages": [ASSISTANT, *QUESTION]}, "messages",
                 "roles out of order at messages[0]: expected user after the start, got assistant",
                 id="assistant first"),
    pytest.param({"messages": [SYSTEM, {"role": "developer", "content": "d"}, *QUESTION]}, "messages",
                 "roles out of order at messages[1]: expected user after system, got system",
                 id="two system messages"),
    pytest.param({"messages": [*QUESTION, ASSISTANT, SYSTEM, *QUESTION]}, "messages",
                 "roles out of order at messages[2]: expected user after assistant, got system", id="system later"),
    pytest.param({"messages": [*QUESTION, *QUESTION]}, "messages",
                 "roles out of order at messages[1]: expected assistant after user, got user", id="two user turns"),
    pytest.param({"messages": [*QUESTION, ASSISTANT]}, "messages",
                 "the prompt must end with a user turn or tool results, not with assistant (messages[1])",
                 id="assistant last"),
    # values of the wrong type or out of range
    pytest.param({"stop": [""]}, "stop", "Invalid 'stop': an empty stop string is not allowed", id="empty stop"),
    pytest.param({"stop": list("abcde")}, "stop", "Invalid 'stop': List should have at most 4 items", id="five stops"),
    pytest.param({"stop": 5}, "stop", "Invalid 'stop': must be a string or a list of at most 4 strings",
                 id="stop a number"),
    pytest.param({"stream": "yes"}, "stream", "Invalid 'stream': Input should be a valid boolean", id="stream yes"),
    pytest.param({"max_tokens": "5"}, "max_tokens", "Invalid 'max_tokens': Input should be a valid integer",
                 id="max_tokens text"),
    pytest.param({"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
                 "Invalid 'messages[0].content': must be a string or a list of text parts", id="content a number"),
    # content parts: text only
    pytest.param({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}]},
                 "messages[0].content", "part 1 is of type 'image_url'; this server supports only text content",
                 id="image part"),
])
def test_refused_requests_get_400_naming_the_field(api, fields, param, message):
    response = httpx.post(f"{api}/chat/completions", headers=KEY, timeout=60,
                          json={"messages": QUESTION, "max_tokens": 4, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    assert message in error["message"]


def test_official_client_requests_with_text_parts_and_explicit_defaults_are_accepted(api):
    c = client(api)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
             {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "a fever?"}]}]
    reply = c.chat.completions.create(
        model="medgpt", messages=parts, max_tokens=3, temperature=0, user="clinic-7", seed=1, stop="\n\n",
        extra_body={"response_format": {"type": "text"}, "logprobs": False, "frequency_penalty": 0, "top_p": None})
    plain = c.chat.completions.create(model="medgpt", max_tokens=3, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is\na fever?"}])
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens  # text parts joined by lines, developer = system
    assert reply.choices[0].message.content == plain.choices[0].message.content
    # a call's result right after it is in order; a message dumped whole (its null fields) is accepted
    call = {"id": "call_1", "type": "function", "function": {"name": "thermometer", "arguments": "{}"}}
    follow = [*QUESTION, {"role": "assistant", "content": None, "refusal": None, "annotations": None, "audio": None,
                          "function_call": None, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "38.5 C"}]}]
    assert c.chat.completions.create(model="medgpt", messages=follow, max_tokens=2).choices[0].message.role == "assistant"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_gets_413_at_once(api, chunked):
    body = json.dumps({"messages": [{"role": "user", "content": "fever " * 200_000}], "max_tokens": 1}).encode()
    assert len(body) > 1 << 20  # the default --max_request_bytes
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    started = time.perf_counter()
    response = httpx.post(f"{api}/chat/completions", content=content, timeout=60,
                          headers={**KEY, "Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error"] == {"message": "The request body is larger than this server accepts (1048576 bytes).",
                                        "type": "invalid_request_error", "param": None, "code": None}
    assert time.perf_counter() - started < 5
    assert httpx.get(api.removesuffix("/v1") + "/health", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir):
    from medgpt.args import ModelArguments
    from medgpt.generation import ChatModel

    return ChatModel.load(ModelArguments(model_name_or_path=str(tiny_model_dir)))


def test_health_answers_while_a_long_prompt_is_tokenized(chat_model, monkeypatch):
    from fastapi.testclient import TestClient

    import openai_api

    tokenizing, release, tokenized = threading.Event(), threading.Event(), threading.Event()
    count_tokens = chat_model.count_tokens

    def slow_count_tokens(text):  # tokenization held until /health has answered (or 10 s have passed)
        tokenizing.set()
        release.wait(timeout=10)
        tokenized.set()
        return count_tokens(text)

    monkeypatch.setattr(chat_model, "count_tokens", slow_count_tokens)
    app = openai_api.create_app(chat_model, openai_api.ServerArguments())
    long_prompt = {"messages": [{"role": "user", "content": "fever " * 150_000}], "max_tokens": 1}  # under 1 MiB
    with TestClient(app) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(http.post, "/v1/chat/completions", json=long_prompt)
        assert tokenizing.wait(timeout=60)
        health = http.get("/health")
        answered_while_tokenizing = not tokenized.is_set()
        release.set()
        assert health.status_code == 200 and answered_while_tokenizing
        refused = answer.result(timeout=120)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


# ---------------------------------------------------------------- tools and reasoning through the API

TOOL_QUESTION = [{"role": "user", "content": "Can I take aspirin with warfarin?"}]


@pytest.fixture(scope="module")
def tool_api(tmp_path_factory, tiny_model_dir):
    """A tiny model trained until it answers that question with its reasoning and a tool call, served."""
    import supervised_finetuning
    from conftest import write_jsonl
    from test_chat_formats import CALL, TOOLS

    root = tmp_path_factory.mktemp("tool-api")
    record = {"messages": [*TOOL_QUESTION, {"role": "assistant", "content": "", "reasoning_content":
                                            "Check the interaction.", "tool_calls": [{"function": CALL}]}],
              "tools": TOOLS}
    data = write_jsonl(root / "calls.jsonl", [record] * 4)
    supervised_finetuning.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_files", str(data), "--output_dir", str(root / "model"),
        "--validation_split_percentage", "0", "--max_steps", "100", "--learning_rate", "1e-2", "--use_peft", "false",
        "--per_device_train_batch_size", "4", "--logging_steps", "10", "--report_to", "none", "--save_strategy", "no",
        "--gradient_checkpointing", "false", "--seed", "1", "--tool_format", "default"])
    port = free_port()
    process = start("openai_api.py", "--base_model", str(root / "model"), "--port", str(port),
                    ready_url=f"http://127.0.0.1:{port}/health")
    yield f"http://127.0.0.1:{port}/v1", TOOLS
    stop(process)


@pytest.mark.slow
def test_api_returns_tool_calls_and_reasoning_through_the_official_client(tool_api):
    import json

    base_url, tools = tool_api
    c = client(base_url, key="none")
    reply = c.chat.completions.create(model="medgpt", messages=TOOL_QUESTION, tools=tools, temperature=0,
                                      max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "check_drug_interaction" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"drug_a": "warfarin", "drug_b": "aspirin"}
    assert choice.message.model_extra["reasoning_content"] == "Check the interaction."
    # streamed: reasoning deltas, then the call, then finish_reason tool_calls
    chunks = [ch for ch in c.chat.completions.create(model="medgpt", messages=TOOL_QUESTION, tools=tools,
                                                     temperature=0, max_tokens=80, stream=True) if ch.choices]
    reasoning = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for ch in chunks)
    calls = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
    assert reasoning.strip() == "Check the interaction."
    assert [tc.function.name for tc in calls] == ["check_drug_interaction"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice none: no tools offered, so no calls come back
    plain = c.chat.completions.create(model="medgpt", messages=TOOL_QUESTION, tools=tools, tool_choice="none",
                                      temperature=0, max_tokens=80)
    assert plain.choices[0].finish_reason != "tool_calls" and not plain.choices[0].message.tool_calls
    # the conversation goes on with the tool's result
    follow = [*TOOL_QUESTION, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": '{"severity": "major"}'}]
    more = c.chat.completions.create(model="medgpt", messages=follow, tools=tools, temperature=0, max_tokens=8)
    assert more.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("body, message", [
    ({"tool_choice": "required"}, "tool_choice: only 'auto' and 'none'"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "with a 'name'"),
    ({"messages": [*TOOL_QUESTION, {"role": "tool", "content": "x"}]}, "expected assistant after user, got tool"),
])
def test_bad_tool_requests_get_400(api, body, message):
    response = httpx.post(f"{api}/chat/completions", headers={"Authorization": "Bearer test-key"}, timeout=60,
                          json={"messages": TOOL_QUESTION, "max_tokens": 4, **body})
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_disconnect_mid_stream_does_not_stop_the_server(api):
    with httpx.stream("POST", f"{api}/chat/completions", headers={"Authorization": "Bearer test-key"}, timeout=60,
                      json={"messages": QUESTION, "max_tokens": 64, "stream": True}) as response:
        next(response.iter_lines())  # read one event, then hang up
    started = time.time()
    reply = client(api).chat.completions.create(model="medgpt", messages=QUESTION, max_tokens=4)
    assert reply.choices[0].message.content is not None
    assert time.time() - started < 60


def test_32_concurrent_requests_all_answered(api):
    def ask(index):
        started = time.perf_counter()
        reply = client(api).chat.completions.create(
            model="medgpt", messages=[{"role": "user", "content": f"Question {index}: what is anemia?"}], max_tokens=4)
        return time.perf_counter() - started, reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(ask, range(32), timeout=300))
    latencies = sorted(latency for latency, _ in results)
    assert len(results) == 32 and all(isinstance(text, str) for _, text in results)
    p50, p95 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95) - 1]
    print(f"\n32 concurrent requests: p50 {p50:.2f}s, p95 {p95:.2f}s")


def test_web_demo_streams_an_answer_and_answers_from_the_knowledge_base_in_chromium(tiny_model_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("MEDGPT_REQUIRE_BROWSER"):
            raise AssertionError("Chromium is not installed: run `apt-get install chromium` (run_tests.sh does).")
        pytest.skip("Chromium is not installed (apt-get install chromium); run_tests.sh installs it")
    from playwright.sync_api import sync_playwright

    port = free_port()
    process = start("gradio_demo.py", "--base_model", str(tiny_model_dir), "--port", str(port), "--max_new_tokens", "1024",
                    "--temperature", "0", "--knowledge_base", "true", "--index_dir", str(tmp_path / "index"),
                    ready_url=f"http://127.0.0.1:{port}/")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("#question textarea", timeout=60000)
            assert "not medical advice" in page.inner_text("#disclaimer")
            page.fill("#question textarea", "What is a fever?")
            page.click("#send")
            page.wait_for_function(
                "() => { const bots = document.querySelectorAll('#chatbot .bot');"
                " return bots.length > 0 && bots[bots.length - 1].innerText.trim().length > 0; }", timeout=120000)
            assert "What is a fever?" in page.inner_text("#chatbot")
            page.screenshot(path=str(tmp_path / "gradio_demo.png"))
            assert (tmp_path / "gradio_demo.png").stat().st_size > 10000
            page.click("#stop")  # the 1024-token answer ends now and no longer grows
            time.sleep(1.0)
            stopped = page.inner_text("#chatbot")
            time.sleep(2.0)
            assert page.inner_text("#chatbot") == stopped
            page.click("#clear")
            page.wait_for_function("() => !document.querySelector('#chatbot').innerText.includes('What is a fever?')",
                                   timeout=30000)
            # a dose question: MedGPT's label limits appear below the (random tiny model's) answer when it ends
            page.fill("#question textarea", "How much paracetamol can an adult take in a day?")
            page.click("#send")
            page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('Dose check')",
                                   timeout=120000)
            assert "never more than 4 g (4,000 mg) in 24 hours" in page.inner_text("#chatbot")

            page.get_by_role("tab", name="Knowledge base").click()
            page.fill("#kb-question textarea", "What blood pressure reading counts as hypertension?")
            page.click("#kb-ask")
            page.wait_for_function("() => document.querySelector('#kb-answer').innerText.includes('Sources:')",
                                   timeout=120000)
            assert "hypertension.md" in page.inner_text("#kb-answer")
            page.screenshot(path=str(tmp_path / "gradio_knowledge_base.png"))
            page.fill("#kb-question textarea", "How do I reverse a linked list in Python?")
            page.click("#kb-ask")
            page.wait_for_function("() => document.querySelector('#kb-answer').innerText.includes(\"I don't know\")",
                                   timeout=60000)
            browser.close()
    finally:
        stop(process)
