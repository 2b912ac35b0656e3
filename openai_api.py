"""An OpenAI-compatible chat API for a MedGPT model (FastAPI + uvicorn, transformers backend).

    python openai_api.py --base_model outputs/sft-merged --port 8000 --api_key secret
    curl http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer secret" \\
         -H "Content-Type: application/json" \\
         -d '{"model": "medgpt", "messages": [{"role": "user", "content": "What is a fever?"}]}'

Endpoints: GET /v1/models, POST /v1/chat/completions (with "stream": true for server-sent events
in OpenAI's chunk format, ending with [DONE]), GET /health. Supported request fields: model,
messages (system/user/assistant with tool_calls/tool), max_tokens (or max_completion_tokens),
temperature, top_p, stop, n (1 only), stream, stream_options.include_usage, tools and tool_choice
(auto or none). An answer's reasoning (a <think> block) comes back as message.reasoning_content, and
the tool calls it makes as message.tool_calls with finish_reason "tool_calls" (in streams too).
With --api_key (or MEDGPT_API_KEY) every request needs
"Authorization: Bearer <key>". Requests are answered one generation at a time (queued);
a client that disconnects mid-stream stops its generation.

Answers come from a language model: they can be wrong and are not medical advice.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medgpt.args import ModelArguments, parse_args, run_cli
from medgpt.generation import ChatModel, GenerationArguments


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


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        values = [value] if isinstance(value, str) else value
        if len(values) > 4:
            raise ValueError("at most 4 stop sequences")
        return values


def error(status: int, message: str, code: str | None = None, param: str | None = None,
          kind: str = "invalid_request_error") -> JSONResponse:
    """An error response in OpenAI's format."""
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def create_app(chat: ChatModel, args: ServerArguments) -> FastAPI:
    app = FastAPI(title="MedGPT OpenAI-compatible API", docs_url=None, redoc_url=None)
    api_key = args.api_key or os.environ.get("MEDGPT_API_KEY")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                             code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, "Invalid request: the body is not valid JSON.")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return error(400, f"Invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), kind="invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return error(500, "The server failed to answer this request.", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": args.model_name, "object": "model", "created": 0, "owned_by": "medgpt"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if body.n != 1:
            return error(400, "Only n=1 is supported.", param="n")
        try:
            messages, tools = request_conversation(body)
        except ValueError as problem:
            return error(400, f"Invalid request: {problem}", param=getattr(problem, "param", "messages"))
        max_tokens = body.max_completion_tokens or body.max_tokens or min(args.default_max_tokens, args.max_tokens_limit)
        if max_tokens > args.max_tokens_limit:
            return error(400, f"max_tokens is {max_tokens}; this server allows at most {args.max_tokens_limit}.",
                         param="max_tokens")
        prompt_tokens = chat.count_tokens(chat.prompt(messages, tools=tools))
        if prompt_tokens > args.max_input_tokens:
            return error(400, f"The messages are {prompt_tokens} tokens; this server accepts at most "
                              f"{args.max_input_tokens}. Shorten the conversation.", param="messages",
                         code="context_length_exceeded")
        settings = GenerationArguments(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                       top_k=0, repetition_penalty=1.0)
        created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        model_name = body.model or args.model_name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_chunks(chat, messages, settings, body.stop, request, completion_id, created, model_name,
                              prompt_tokens, include_usage, tools),
                media_type="text/event-stream",
            )
        result = (await run_in_threadpool(chat.complete, [messages], settings, body.stop, tools))[0]
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": answer_message(result.text, result.reasoning, result.tool_calls),
                         "finish_reason": result.finish_reason}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    return app


def request_conversation(body: ChatRequest) -> tuple[list[dict], list[dict] | None]:
    """The request's messages in MedGPT's shapes (tool call arguments as objects) and the tools offered,
    checked: turns in order, ending with the user or with tool results; calls name offered tools."""
    from medgpt.records import check_turn_order
    from medgpt.tool_calls import normalize_call, normalize_tools

    tools = normalize_tools(body.tools) if body.tools else None
    choice = body.tool_choice
    if choice not in (None, "auto", "none"):
        problem = ValueError("tool_choice: only 'auto' and 'none' are supported.")
        problem.param = "tool_choice"
        raise problem
    if choice == "none":
        tools = None
    declared = [tool["function"]["name"] for tool in body.tools or []] if body.tools else None
    messages = []
    for index, message in enumerate(body.messages):
        item = {"role": message.role, "content": message.content or ""}
        if message.role == "assistant" and message.tool_calls:
            item["tool_calls"] = [normalize_call(call, f"messages[{index}].tool_calls[{n}]", declared)
                                  for n, call in enumerate(message.tool_calls)]
        elif not item["content"].strip():
            raise ValueError(f"messages[{index}] ({message.role}) has no content.")
        messages.append(item)
    check_turn_order(messages, last_role="user")
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


async def stream_chunks(chat, messages, settings, stop, request, completion_id, created, model_name,
                        prompt_tokens, include_usage, tools=None):
    """Server-sent events: a role chunk, reasoning and content chunks, a finish chunk, optional usage, [DONE].
    With tools offered the answer is read whole before it is sent, so its tool calls can be taken out of it."""

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    stop_event = threading.Event()
    text = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        raw = ""
        async for kind, piece in iterate_in_threadpool(chat.stream_parts(messages, settings, stop, stop_event, tools)):
            if await request.is_disconnected():
                return  # finally stops the generation
            text += piece
            raw += piece if kind == "content" else ""
            if kind == "reasoning":
                yield chunk({"reasoning_content": piece})
            elif not tools:
                yield chunk({"content": piece})
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
