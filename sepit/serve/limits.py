"""Request limits: body size before any parsing, then questions, residues and new tokens.

:class:`BodySizeLimit` is a plain ASGI middleware, so an oversized body is refused from its
``Content-Length`` header or, for chunked uploads, as soon as the streamed bytes pass the limit,
before FastAPI reads or parses a byte of JSON.  The ``check_*`` functions enforce the other
limits on validated requests and raise :class:`~sepit.serve.errors.LimitExceeded` naming the
limit (answered with 413 or 422 and a JSON error).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from sepit.serve.config import LimitsConfig
from sepit.serve.errors import InvalidInput, LimitExceeded, error_body


async def send_json(send, status: int, body: dict, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete JSON response on a raw ASGI ``send``."""
    data = json.dumps(body).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + list(extra_headers)})
    await send({"type": "http.response.body", "body": data})


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 before parsing.

    The body is read here (bounded) and replayed to the application, which would buffer it
    anyway to parse JSON; later ``receive`` calls pass through so disconnects still arrive.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    def _too_large(self, size: int, declared: bool) -> dict:
        how = "Content-Length" if declared else "streamed body size"
        err = LimitExceeded(
            "max_body_bytes", size, self.max_bytes, f"request body ({how}, bytes)", status=413
        )
        return err.body()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_json(send, 400, error_body(
                        f"invalid Content-Length header {value[:40]!r}", "invalid_request_error",
                        "Content-Length", 400))
                    return
        if declared is not None and declared > self.max_bytes:
            await send_json(send, 413, self._too_large(declared, True))
            return

        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nothing to answer
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await send_json(send, 413, self._too_large(total, False))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def check_questions(questions: Sequence[str], limits: LimitsConfig, field: str = "questions") -> list[str]:
    """Non-empty questions within the count and length limits; returns them stripped."""
    if len(questions) == 0:
        raise InvalidInput(f"{field} is empty: ask at least one question", param=field)
    if len(questions) > limits.max_questions:
        raise LimitExceeded("max_questions", len(questions), limits.max_questions, f"number of {field}")
    out = []
    for i, q in enumerate(questions):
        q = q.strip()
        if not q:
            raise InvalidInput(f"{field}[{i}] is empty or whitespace", param=f"{field}[{i}]")
        if len(q) > limits.max_question_chars:
            raise LimitExceeded(
                "max_question_chars", len(q), limits.max_question_chars, f"length of {field}[{i}] (characters)"
            )
        out.append(q)
    return out


def check_residues(n_residues: int, limits: LimitsConfig) -> None:
    if n_residues > limits.max_residues:
        raise LimitExceeded("max_residues", n_residues, limits.max_residues, "protein length (residues)")


def check_max_new_tokens(requested: Optional[int], limits: LimitsConfig, field: str) -> Optional[int]:
    """The request's token budget as asked (None: the replica's default), refused when above
    ``limits.max_new_tokens``."""
    if requested is not None and requested > limits.max_new_tokens:
        raise LimitExceeded("max_new_tokens", requested, limits.max_new_tokens, field)
    return requested


def resolve_max_new_tokens(requested: Optional[int], default: int, limits: LimitsConfig, field: str) -> int:
    """The request's token budget (or the default), refused when above ``limits.max_new_tokens``."""
    requested = check_max_new_tokens(requested, limits, field)
    return min(default, limits.max_new_tokens) if requested is None else requested
