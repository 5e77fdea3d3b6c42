"""OpenAI chat-completions compatibility: messages -> a SEPIT question, results -> OpenAI objects.

SEPIT answers single-turn questions under its trained system prompt, so a chat request holds
exactly one ``user`` message (its ``<protein>`` marks where the protein goes; prepended when
absent).  Custom system prompts and earlier assistant turns are refused with a reason rather
than silently dropped.  Streaming follows OpenAI's server-sent events: a first chunk with the
assistant role, content chunks, a final chunk with ``finish_reason``, an optional usage chunk
(``stream_options.include_usage``), then ``data: [DONE]``.

OpenAI fields whose meaning the server cannot serve (several choices, log-probabilities, tool
calls, JSON output modes) are refused with 400 and OpenAI's error shape
(:func:`refuse_unsupported`); a client asking for them gets an error, never a plain answer that
silently lacks what it asked for.  Harmless fields (``user``, ``metadata``, ...) are ignored.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable, Optional

from sepit.serve.config import LimitsConfig
from sepit.serve.errors import InvalidInput, LimitExceeded, Unsupported, error_body
from sepit.serve.limits import check_questions
from sepit.serve.protocol import GenerationResult, StreamEvent
from sepit.serve.schemas import (
    ChatChoice, ChatChoiceMessage, ChatCompletion, ChatCompletionRequest, ChatMessage, Usage,
)


def refuse_unsupported(request: ChatCompletionRequest) -> None:
    """Raise :class:`Unsupported` (400, ``param`` = the field) for a field this server cannot honour."""
    if request.n > 1:
        raise Unsupported(f"n={request.n}: this server returns one choice per request; send {request.n} "
                          "requests instead (with different `seed`s for different samples)", param="n")
    if request.logprobs:
        raise Unsupported("logprobs are not returned by this server; send `logprobs: false` or leave it out",
                          param="logprobs")
    if request.top_logprobs:
        raise Unsupported("top_logprobs are not returned by this server; leave `top_logprobs` out",
                          param="top_logprobs")
    for name in ("tools", "functions"):
        if getattr(request, name):
            raise Unsupported(f"`{name}`: tool calling is not supported by this model; leave `{name}` out",
                              param=name)
    for name in ("tool_choice", "function_call"):
        value = getattr(request, name)
        if value is not None and value != "none":
            raise Unsupported(f"`{name}`: tool calling is not supported by this model; leave `{name}` out "
                              "or set it to \"none\"", param=name)
    if request.response_format is not None:
        kind = request.response_format.get("type")
        if kind != "text":
            raise Unsupported(f"response_format type {kind!r} is not supported: the model answers in free text; "
                              "use {\"type\": \"text\"} or leave `response_format` out", param="response_format")


def question_from_messages(messages: list[ChatMessage], limits: LimitsConfig) -> str:
    if len(messages) > limits.max_messages:
        raise LimitExceeded("max_messages", len(messages), limits.max_messages, "number of messages")
    for i, msg in enumerate(messages):
        if msg.role in ("system", "developer"):
            raise InvalidInput(
                f"messages[{i}]: custom {msg.role} prompts are not supported; the model answers under the "
                "system prompt it was trained with", param=f"messages[{i}].role",
            )
        if msg.role == "assistant":
            raise InvalidInput(
                f"messages[{i}]: multi-turn conversations are not supported; send one user message",
                param=f"messages[{i}].role",
            )
    if len(messages) != 1:
        raise InvalidInput(f"send exactly one user message (got {len(messages)})", param="messages")
    (question,) = check_questions([messages[0].text()], limits, field="messages[0].content")
    return question


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(result: GenerationResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


def completion(model: str, result: GenerationResult, extras: dict) -> ChatCompletion:
    return ChatCompletion(
        id=_new_id(), created=int(time.time()), model=model,
        choices=[ChatChoice(index=0, message=ChatChoiceMessage(content=result.text), finish_reason=result.finish_reason)],
        usage=usage(result), sepit=extras,
    )


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def sse_stream(
    model: str,
    first: Optional[StreamEvent],
    next_event: Callable[[], Awaitable[Optional[StreamEvent]]],
    cancel: Callable[[], None],
    include_usage: bool,
    extras_for: Callable[[GenerationResult], dict],
) -> AsyncIterator[str]:
    """SSE text of one streamed completion, starting from the already received ``first`` event."""
    cid, created = _new_id(), int(time.time())

    def chunk(delta: dict, finish_reason: Optional[str] = None, **extra) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}

    async def events() -> AsyncIterator[str]:
        finished = False
        event = first
        try:
            yield _sse(chunk({"role": "assistant", "content": ""}))
            while event is not None:
                if event.delta:
                    yield _sse(chunk({"content": event.delta}))
                if event.done:
                    result = event.result or GenerationResult()
                    if result.expired:
                        yield _sse(error_body("the stream ran past the request timeout", "timeout",
                                              "request_timeout_s", 504))
                        break
                    if result.error:
                        yield _sse(error_body(result.error, "server_error", None, 500))
                        break
                    yield _sse(chunk({}, result.finish_reason, sepit=extras_for(result)))
                    if include_usage:
                        final = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                 "choices": [], "usage": usage(result).model_dump()}
                        yield _sse(final)
                    break
                event = await next_event()
            finished = True
        except (asyncio.TimeoutError, TimeoutError):  # distinct classes before Python 3.11
            yield _sse(error_body("the stream ran past the request timeout", "timeout", "request_timeout_s", 504))
        except Exception as exc:  # noqa: BLE001 - a broken stream ends with an error event, not a dead socket
            yield _sse(error_body(f"stream failed: {type(exc).__name__}", "server_error", None, 500))
        finally:
            if not finished:  # timeout, error, or the client went away (cancellation): stop the model row
                cancel()
        yield "data: [DONE]\n\n"

    return events()
