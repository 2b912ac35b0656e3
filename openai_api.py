"""An OpenAI-compatible chat API for a MedGPT model (FastAPI + uvicorn, transformers backend).

    python openai_api.py --base_model outputs/sft-merged --port 8000 --api_key secret
    curl http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer secret" \\
         -H "Content-Type: application/json" \\
         -d '{"model": "medgpt", "messages": [{"role": "user", "content": "What is a fever?"}]}'

Endpoints: GET /v1/models, POST /v1/chat/completions (with "stream": true for server-sent events
in OpenAI's chunk format, ending with [DONE]), GET /health. Supported request fields: model,
messages (system or developer first, then user and assistant turns alternating, assistant tool_calls
followed by their tool results, ending with a user turn or tool results; content as a string or as
text parts), max_tokens (or max_completion_tokens), temperature, top_p, stop (up to 4 non-empty
strings), n (1 only), stream, stream_options, tools and tool_choice (auto or none); user,
safety_identifier and seed are accepted and change nothing (temperature 0 is deterministic). Other
OpenAI fields (response_format, logprobs, ...) are refused unless they ask for nothing (null, false,
their default), unknown fields and values of the wrong type are refused, each error naming the field,
in OpenAI's error shape. A body over --max_request_bytes gets 413 before it is read.
An answer's reasoning (a <think> block) comes back as message.reasoning_content, and
the tool calls it makes as message.tool_calls with finish_reason "tool_calls" (in streams too).
With --api_key (or MEDGPT_API_KEY) every request needs
"Authorization: Bearer <key>".

Concurrent requests are batched (dynamic batching): requests that arrive within --batch_window_ms of the
oldest waiting one, up to --max_batch_size, are generated together in one left-padded batch (each prompt
prefilled alone, the decoding steps shared); the next batch starts when this one is done (a request does
not join a running batch). Streamed and plain requests batch together. Greedy requests (temperature 0)
batch with each other and get the answer they get alone (only the rounding of batch-shaped steps differs,
which in fp32 rarely flips a token); sampled requests batch with those of the same temperature and top_p.
Each request keeps its own max_tokens and stop strings and is answered as soon as its own answer ends.
--max_batch_size 1 answers one request at a time, in order of arrival. A client that disconnects stops
its own generation; the others go on. GET /health reports the batches run so far, by size.

Answers come from a language model: they can be wrong and are not medical advice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from medgpt.args import ModelArguments, parse_args, run_cli
from medgpt.generation import ChatModel, DynamicBatcher, GenerationArguments

logger = logging.getLogger("medgpt.api")


@dataclass
class ServerArguments:
    """Where to listen and what to accept."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0 exposes it to the network)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    api_key: str | None = field(
        default=None, metadata={"help": "Require 'Authorization: Bearer KEY' (default: $MEDGPT_API_KEY, else open)."}
    )
    model_name: str = field(default="medgpt", metadata={"help": "The model id reported by /v1/models."})
    max_input_tokens: int = field(default=2048, metadata={"help": "Longest accepted prompt, in tokens."})
    max_tokens_limit: int = field(default=1024, metadata={"help": "Largest accepted max_tokens."})
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request gives none."})
    max_request_bytes: int = field(
        default=1 << 20,
        metadata={"help": "Largest accepted request body, in bytes (larger: 413, before it is read). The default, "
                  "1 MiB, holds any prompt of 32k tokens or fewer with tool schemas, and bounds the work one "
                  "request can cost before its prompt is measured."},
    )
    max_batch_size: int = field(
        default=16,
        metadata={"help": "Most requests generated together in one batch (dynamic batching); 1 answers one request "
                  "at a time. Memory grows with it: batch x (prompt + max_tokens) tokens of KV cache."},
    )
    batch_window_ms: float = field(
        default=50.0,
        metadata={"help": "How long the oldest waiting request waits for others to batch with, in milliseconds "
                  "(requests that queued during the previous batch start at once)."},
    )

    def __post_init__(self):
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"--max_batch_size {self.max_batch_size}: must be at least 1 (1: one request at a time).")
        if not 0 <= self.batch_window_ms <= 10_000:
            problems.append(f"--batch_window_ms {self.batch_window_ms}: must be between 0 and 10000.")
        for name in ("max_input_tokens", "max_tokens_limit", "default_max_tokens", "max_request_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} {getattr(self, name)}: must be at least 1.")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port {self.port}: must be between 0 and 65535.")
        if problems:
            raise ValueError(" ".join(problems))


class Strict(BaseModel):
    """A part of a request: unknown fields and values of the wrong type ("yes" for true, "5" for 5) are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name for system
    content: list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    # what the official client sends back when a reply's message is dumped whole: accepted when null
    refusal: None = None
    audio: None = None
    function_call: None = None
    annotations: None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value):
        """A string, or OpenAI's list of content parts, of which this server reads text ones only."""
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if value is not None and not isinstance(value, list):
            raise ValueError("must be a string or a list of text parts")
        for index, part in enumerate(value or []):
            if isinstance(part, dict) and part.get("type") != "text":
                raise ValueError(f"part {index} is of type {part.get('type')!r}; this server supports only text "
                                 "content ({\"type\": \"text\", \"text\": ...})")
        return value


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool = True  # accepted; this server adds no obfuscation padding to chunks


class ChatRequest(Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] = Field(default=[], max_length=4)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None  # checked with the conversation: "auto" or "none"
    # accepted and without effect here: who is asking (for abuse monitoring at OpenAI), and a seed (OpenAI's own
    # determinism is best effort; here temperature 0 is deterministic and sampled answers do not follow the seed)
    user: str | None = None
    safety_identifier: str | None = None
    seed: int | None = None

    @field_validator("temperature", "top_p", "n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        if not isinstance(value, (str, list)):
            raise ValueError("must be a string or a list of at most 4 strings")
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value):
        if "" in value:
            raise ValueError("an empty stop string is not allowed")
        return value


# OpenAI's request fields this server does not implement, each with the value that asks for nothing: that value
# (or null) is accepted, so clients that send defaults explicitly work; any other value is refused.
NOT_IMPLEMENTED = {
    "audio": None, "frequency_penalty": 0, "function_call": None, "functions": None, "logit_bias": {},
    "logprobs": False, "metadata": None, "modalities": ["text"], "moderation": None, "parallel_tool_calls": True,
    "prediction": None, "presence_penalty": 0, "prompt_cache_key": None, "prompt_cache_options": None,
    "prompt_cache_retention": None, "reasoning_effort": None, "response_format": {"type": "text"},
    "service_tier": "auto", "store": False, "top_logprobs": 0, "verbosity": None, "web_search_options": None,
}


class RequestError(ValueError):
    """A request this server refuses (400), with the field it names (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def read_request(raw: bytes) -> ChatRequest:
    """The request body, checked; every problem of its fields named at once (the first is the ``param``)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestError("Invalid request: the body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise RequestError("Invalid request: the body must be a JSON object.")
    problems = [(f"{name} is not supported by this server", name) for name, nothing in NOT_IMPLEMENTED.items()
                if data.get(name) not in (None, nothing)]
    try:
        body = ChatRequest.model_validate({key: value for key, value in data.items() if key not in NOT_IMPLEMENTED})
    except ValidationError as invalid:
        problems += [describe(problem) for problem in invalid.errors()]
    if problems:
        raise RequestError("; ".join(message for message, _ in problems) + ".", param=problems[0][1])
    return body


def describe(problem: dict) -> tuple[str, str]:
    """One pydantic error in OpenAI's words, with the field's path (``messages[0].content``)."""
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in problem["loc"]).lstrip(".")
    if problem["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if problem["type"] == "none_required":
        return f"{param} is not supported by this server", param
    reason = str(problem["ctx"]["error"]) if problem["type"] == "value_error" else problem["msg"]
    return f"Invalid '{param}': {reason}", param


def error(status: int, message: str, code: str | None = None, param: str | None = None,
          kind: str = "invalid_request_error") -> JSONResponse:
    """An error response in OpenAI's format."""
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def create_app(chat: ChatModel, args: ServerArguments) -> FastAPI:
    batcher = DynamicBatcher(chat, args.max_batch_size, args.batch_window_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="MedGPT OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher = batcher
    api_key = args.api_key or os.environ.get("MEDGPT_API_KEY")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                             code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), kind="invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)  # the cause, in the server's log
        return error(500, "The server failed to answer this request.", kind="server_error")

    @app.get("/health")
    async def health():
        # batches run so far, by size (how well concurrent requests are batched)
        return {"status": "ok", "batches": {str(size): count for size, count in sorted(batcher.batch_sizes.items())}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": args.model_name, "object": "model", "created": 0, "owned_by": "medgpt"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()  # over --max_request_bytes: 413 (BodyLimit)
        with batcher.arriving():  # a batch about to start waits (briefly) for this request
            try:  # parsing, the chat template and tokenization are CPU work: off the event loop, so others are served
                body, prompt, tools, max_tokens, prompt_tokens = await run_in_threadpool(prepare, raw, chat, args)
            except RequestError as problem:
                return error(400, str(problem), code=problem.code, param=problem.param)
            settings = GenerationArguments(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                           top_k=0, repetition_penalty=1.0)
            pending = batcher.submit(prompt, settings, body.stop, tools, stream=body.stream)
        created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        model_name = body.model or args.model_name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_chunks(batcher, pending, request, completion_id, created, model_name, prompt_tokens,
                              include_usage, tools),
                media_type="text/event-stream",
            )
        result = await answer(pending, request)
        if result is None:  # the client left; nobody reads an answer
            return Response(status_code=499)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": answer_message(result.text, result.reasoning, result.tool_calls),
                         "finish_reason": result.finish_reason}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    app.add_middleware(BodyLimit, max_bytes=args.max_request_bytes)
    return app


class BodyLimit:
    """Answers 413 to a request body over ``max_bytes``: from its Content-Length before anything is read, and
    as a chunked body arrives (reading past the limit fails, and the failure is answered here)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.too_large = error(413, f"The request body is larger than this server accepts ({max_bytes} bytes).")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        received = 0

        async def receive_within_limit():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.max_bytes:
                raise ValueError("request body over the limit")
            return event

        try:
            await self.app(scope, receive_within_limit, send)
        except Exception:  # raised through the middleware and route that were reading the body
            if received <= self.max_bytes:
                raise
            await self.too_large(scope, receive, send)


async def answer(pending, request: Request):
    """A batched request's Completion; None if the client disconnects first (its row is then stopped)."""
    future = asyncio.wrap_future(pending.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=1.0)
        if done:
            return future.result()
        if await request.is_disconnected():
            pending.cancel.set()
            future.cancel()
            return None


def prepare(raw: bytes, chat: ChatModel, args: ServerArguments) -> tuple:
    """A request checked (fields, conversation, lengths): the request, its prompt (the conversation rendered by
    the chat template), the tools offered, max_tokens and the prompt's length in tokens. CPU work (the chat
    template, tokenization): run it in a thread."""
    body = read_request(raw)
    if body.n != 1:
        raise RequestError("n: only n=1 is supported by this server.", param="n")
    messages, tools = request_conversation(body)
    max_tokens = body.max_completion_tokens or body.max_tokens or min(args.default_max_tokens, args.max_tokens_limit)
    if max_tokens > args.max_tokens_limit:
        raise RequestError(f"max_tokens is {max_tokens}; this server allows at most {args.max_tokens_limit}.",
                           param="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    prompt = chat.prompt(messages, tools=tools)
    prompt_tokens = chat.count_tokens(prompt)
    if prompt_tokens > args.max_input_tokens:
        raise RequestError(f"The messages are {prompt_tokens} tokens; this server accepts at most "
                           f"{args.max_input_tokens}. Shorten the conversation.", param="messages",
                           code="context_length_exceeded")
    return body, prompt, tools, max_tokens, prompt_tokens


def request_conversation(body: ChatRequest) -> tuple[list[dict], list[dict] | None]:
    """The request's messages in MedGPT's shapes (text parts joined, developer as system, tool call arguments as
    objects) and the tools offered, checked: turns in order, ending with the user or with tool results (an
    assistant turn last is refused: the template would close it, not continue it); calls name offered tools."""
    from medgpt.records import check_turn_order
    from medgpt.tool_calls import normalize_call, normalize_tools

    try:
        tools = normalize_tools(body.tools) if body.tools else None
    except ValueError as problem:
        raise RequestError(f"Invalid request: {problem}", param="tools") from None
    if body.tool_choice not in (None, "auto", "none"):
        raise RequestError("tool_choice: only 'auto' and 'none' are supported.", param="tool_choice")
    if body.tool_choice == "none":
        tools = None
    declared = [tool["function"]["name"] for tool in body.tools] if body.tools else None
    messages = []
    try:
        for index, message in enumerate(body.messages):
            role = "system" if message.role == "developer" else message.role
            item = {"role": role, "content": "\n".join(part.text for part in message.content or [])}
            if role == "assistant" and message.tool_calls:
                item["tool_calls"] = [normalize_call(call, f"messages[{index}].tool_calls[{n}]", declared)
                                      for n, call in enumerate(message.tool_calls)]
            elif not item["content"].strip():
                raise ValueError(f"messages[{index}] ({message.role}) has no content.")
            messages.append(item)
        check_turn_order(messages, last_role="user", where=lambda index: f"messages[{index}]")
    except ValueError as problem:
        raise RequestError(f"Invalid request: {problem}", param="messages") from None
    return messages, tools


def answer_message(content: str, reasoning: str | None, calls: list[dict]) -> dict:
    """An answer as OpenAI's assistant message: content, reasoning_content, tool_calls (arguments as JSON text)."""
    message = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["function"]["name"],
                          "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
            for call in calls]
    return message


async def stream_chunks(batcher: DynamicBatcher, pending, request, completion_id, created, model_name, prompt_tokens,
                        include_usage, tools=None):
    """Server-sent events: a role chunk, reasoning and content chunks, a finish chunk, optional usage, [DONE].
    With tools offered the answer is read whole before it is sent, so its tool calls can be taken out of it."""
    chat = batcher.chat

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    settings, stop_event = pending.settings, pending.cancel
    text = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        raw = ""
        async for kind, piece in iterate_in_threadpool(batcher.parts(pending)):
            if await request.is_disconnected():
                return  # finally stops the generation
            text += piece
            raw += piece if kind == "content" else ""
            if kind == "reasoning":
                yield chunk({"reasoning_content": piece})
            elif not tools:
                yield chunk({"content": piece})
        future = pending.future  # the answer's Completion is ready once its stream has ended
        if future.done() and not future.cancelled() and future.exception() is None:
            completion_tokens = future.result().completion_tokens  # exact: the tokens generated
            finish = "stop" if future.result().finish_reason == "tool_calls" else future.result().finish_reason
        else:
            completion_tokens = chat.count_tokens(text)
            finish = "length" if completion_tokens >= settings.max_new_tokens else "stop"
        if tools:
            parsed = chat.template.parse_response(raw, [tool["function"]["name"] for tool in tools])
            if parsed["content"]:
                yield chunk({"content": parsed["content"]})
            if parsed["tool_calls"]:
                calls = answer_message("", None, parsed["tool_calls"])["tool_calls"]
                yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
                finish = "tool_calls"
        yield chunk({}, finish)
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [], "usage": usage}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        stop_event.set()


def main(argv: list[str] | None = None) -> None:
    model_args, server_args, _ = parse_args((ModelArguments, ServerArguments), argv, description=__doc__)
    import uvicorn

    chat = ChatModel.load(model_args)
    print(f"Serving {model_args.model_name_or_path} as '{server_args.model_name}' on "
          f"http://{server_args.host}:{server_args.port}/v1 (answers are not medical advice)", flush=True)
    uvicorn.run(create_app(chat, server_args), host=server_args.host, port=server_args.port, log_level="info")


if __name__ == "__main__":
    run_cli(main)
