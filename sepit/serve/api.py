"""The FastAPI application of the ingress: routes, error handling and the middleware stack.

Request path, outermost first::

    ResponseCounter (counts and Prometheus metrics) -> ApiKeyMiddleware (401 before the body is read)
      -> BodySizeLimit (413 before JSON parsing) -> FastAPI (pydantic validation -> 422) -> route

Every error leaves as OpenAI-style JSON (:mod:`sepit.serve.errors`); an unexpected exception in a
route becomes a 500 JSON answer and is logged, and the replica keeps serving.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sepit import __version__
from sepit.serve.auth import ApiKeyMiddleware, route_path
from sepit.serve.errors import ApiError, error_body
from sepit.serve.limits import BodySizeLimit
from sepit.serve.schemas import AnswerRequest, AnswerResponse, ChatCompletion, ChatCompletionRequest, ModelList

if TYPE_CHECKING:
    from sepit.serve.ingress import SepitIngress
    from sepit.serve.metrics import IngressMetrics

logger = logging.getLogger("ray.serve")

DESCRIPTION = """\
Ask questions about a protein given as a sequence or a PDB/mmCIF structure.

* `POST /v1/answer`: one protein, several questions, answers with token counts and timings.
* `POST /v1/chat/completions`: OpenAI-compatible; the protein goes in the extra body field
  `protein` and `<protein>` marks its place in the user message; `stream: true` streams SSE.
* `GET /v1/models`, `GET /v1/stats` (batching counters), `GET /healthz`, `GET /readyz`.
* Prometheus metrics (`ray_sepit_*`) are on Ray's metrics export port, not on this app.

OpenAI fields the server cannot honour (`n` > 1, `logprobs`, `tools`, a JSON `response_format`)
are refused with 400; `seed` makes sampling reproducible.

When the server has an API key, `/v1/*` needs `Authorization: Bearer <key>`.
"""


class ResponseCounter:
    """ASGI middleware counting responses by status code (also those sent by inner middleware),
    and reporting them with their latency to ``metrics`` (Prometheus, see :mod:`sepit.serve.metrics`)."""

    def __init__(self, app, counts: Counter, metrics: Optional["IngressMetrics"] = None):
        self.app = app
        self.counts = counts
        self.metrics = metrics
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, path = time.perf_counter(), route_path(scope)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                with self._lock:
                    self.counts[str(message["status"])] += 1
                if self.metrics is not None:
                    self.metrics.response(path, message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body") and self.metrics is not None:
                self.metrics.finished(path, time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, counting_send)


def _location(loc) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def validation_message(exc: RequestValidationError, content_type: str) -> tuple[str, str]:
    errors = exc.errors()
    if not errors:
        return "invalid request", "body"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}", "body"
    if _location(first.get("loc", ())) == "body" and "json" not in (content_type or ""):
        return "the request body must be a JSON object sent with 'Content-Type: application/json'", "body"
    shown = "; ".join(f"{_location(e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5])
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return shown + more, _location(first.get("loc", ()))


def guarded(fn):
    """Turn Serve backpressure into 503 and unexpected exceptions into logged 500 JSON errors."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except ApiError:
            raise
        except (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
            raise ApiError(f"the model replicas are unavailable or at capacity ({type(exc).__name__}); retry later",
                           status=503) from None
        except Exception as exc:  # noqa: BLE001 - never let one request take the replica down
            logger.exception("unexpected error in %s", fn.__name__)
            raise ApiError(f"internal error: {type(exc).__name__}", status=500) from None

    return wrapper


def create_api(ingress: "SepitIngress") -> FastAPI:
    cfg = ingress.config
    app = FastAPI(title="SEPIT protein question answering", version=__version__, description=DESCRIPTION)
    responses: Counter = Counter()

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc, request.headers.get("content-type", ""))
        return JSONResponse(error_body(message, "invalid_request_error", param, 422), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get("/healthz", tags=["probes"], summary="Liveness: the HTTP replica is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], summary="Readiness: a model replica has answered a real generation")
    @guarded
    async def readyz():
        return await ingress.readiness()

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def models():
        return ingress.models()

    @app.post("/v1/answer", response_model=AnswerResponse, tags=["sepit"],
              summary="Answer questions about one protein (sequence or structure)")
    @guarded
    async def answer(body: AnswerRequest):
        return await ingress.answer(body)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, tags=["openai"],
              summary="OpenAI-compatible chat completion about the protein in `protein`",
              responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
    @guarded
    async def chat_completions(body: ChatCompletionRequest):
        if body.stream:
            return StreamingResponse(await ingress.chat_stream(body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await ingress.chat(body))

    @app.get("/v1/stats", tags=["sepit"], summary="Counters: HTTP responses, model requests, batch sizes")
    @guarded
    async def stats():
        return {"ingress": {"responses_by_status": dict(responses), "auth_enabled": ingress.auth.enabled},
                "runner": await ingress.runner_stats()}

    # add_middleware: the last added is the outermost.
    app.add_middleware(BodySizeLimit, max_bytes=cfg.limits.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, auth=ingress.auth)
    app.add_middleware(ResponseCounter, counts=responses, metrics=ingress.metrics)
    return app
