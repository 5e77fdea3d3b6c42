"""The HTTP ingress replica: validates requests, reads structures, calls the model replicas.

:class:`SepitIngress` is a Ray Serve ingress deployment whose FastAPI app
(:func:`sepit.serve.api.create_api`) is built inside the replica, so config-dependent limits and
auth are part of the app.  It holds no model: every generation goes through a handle to the
:class:`~sepit.serve.model_runner.SepitModelRunner` deployment, under the request's deadline.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Optional

from ray import serve

from sepit.serve import openai_compat as oa
from sepit.serve.auth import ApiKeyAuth, resolve_api_key_digest
from sepit.serve.config import ServeConfig
from sepit.serve.errors import ApiError, InvalidInput, NotFound, NotReady, RequestTimeout
from sepit.serve.limits import check_max_new_tokens, check_questions
from sepit.serve.metrics import IngressMetrics
from sepit.serve.protein_input import ResolvedProtein, resolve_protein
from sepit.serve.protocol import GenerationItem, GenerationResult, StreamEvent
from sepit.serve.schemas import (
    AnswerItem, AnswerRequest, AnswerResponse, ChatCompletionRequest, ModelCard, ModelList,
    ProteinInfo, Timings, Usage,
)


class GenerationFailed(ApiError):
    status = 500
    type = "server_error"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


@serve.ingress()
class SepitIngress:
    """FastAPI ingress over a model-runner handle (see the module docstring)."""

    def __init__(self, config: ServeConfig, runner, api_key_digest: Optional[str] = None):
        self.config = config
        self.runner = runner  # DeploymentHandle of SepitModelRunner
        # The digest resolved where the app was built wins; else this replica's environment
        # (on a cluster the key's variable may exist only on the worker nodes).
        self.auth = ApiKeyAuth(api_key_digest or resolve_api_key_digest(config))
        self.model_name = config.served_model_name
        self.created = int(time.time())
        self.metrics = IngressMetrics(self.model_name)  # Prometheus, through Ray Serve's metrics API

    def __serve_build_asgi_app__(self):
        from sepit.serve.api import create_api

        return create_api(self)

    # ------------------------------------------------------------------ helpers
    def _budget(self, client_timeout_s: Optional[float]) -> float:
        budget = self.config.request_timeout_s
        return min(budget, client_timeout_s) if client_timeout_s else budget

    def check_model(self, name: Optional[str]) -> None:
        if name and name != self.model_name:
            raise NotFound(f"model {name!r} is not served here; GET /v1/models lists {self.model_name!r}", param="model")

    async def _protein(self, request) -> ResolvedProtein:
        if getattr(request, "structure", None) is None:  # a sequence is cleaned in microseconds: no thread hop
            return resolve_protein(request, self.config.limits)
        # Structure parsing is CPU work; keep the event loop free for other requests.
        return await asyncio.to_thread(resolve_protein, request, self.config.limits)

    @staticmethod
    def _item(question: str, protein: ResolvedProtein, max_new_tokens: Optional[int], do_sample: Optional[bool],
              temperature: Optional[float], top_p: Optional[float], stop, seed: Optional[int]) -> GenerationItem:
        # Options left None take the model replica's generation defaults (its user_config may change them).
        return GenerationItem(
            question=question, sequence=protein.sequence, coords=protein.coords, coord_mask=protein.coord_mask,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            stop=tuple(stop or ()), seed=seed,
        )

    async def _generate(self, items: list[GenerationItem], budget: float) -> list[GenerationResult]:
        response = self.runner.generate.remote(items, budget)
        try:
            results = await asyncio.wait_for(response, timeout=budget)
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestTimeout(f"no answer within the request timeout of {budget:g} s", param="request_timeout_s") from None
        _raise_for_results(results, budget)
        return results

    @staticmethod
    def protein_info(protein: ResolvedProtein, results: list[GenerationResult]) -> ProteinInfo:
        return ProteinInfo(
            length=len(protein.sequence), source=protein.source, chain=protein.chain,
            residues_with_coords=protein.residues_with_coords,
            structure_used=any(r.structure_used for r in results),
        )

    # ------------------------------------------------------------------ endpoints
    async def answer(self, request: AnswerRequest) -> AnswerResponse:
        t0 = time.perf_counter()
        limits = self.config.limits
        questions = check_questions(request.questions, limits)
        max_new = check_max_new_tokens(request.max_new_tokens, limits, "max_new_tokens")
        protein = await self._protein(request)
        items = [self._item(q, protein, max_new, request.do_sample, request.temperature, request.top_p, request.stop,
                            request.seed) for q in questions]
        t1 = time.perf_counter()
        results = await self._generate(items, self._budget(request.timeout_s))
        t2 = time.perf_counter()
        answers = [
            AnswerItem(question=q, answer=r.text, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                       finish_reason=r.finish_reason, batch_size=r.batch_size)
            for q, r in zip(questions, results)
        ]
        prompt, completion = sum(a.prompt_tokens for a in answers), sum(a.completion_tokens for a in answers)
        info = self.protein_info(protein, results)
        return AnswerResponse(
            id=f"ans-{uuid.uuid4().hex[:24]}", model=self.model_name, answers=answers, protein=info,
            structure_used=info.structure_used,
            usage=Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion),
            timings=Timings(parse_ms=_ms(t1 - t0), queue_ms=round(max(r.queue_ms for r in results), 2),
                            generate_ms=round(max(r.generate_ms for r in results), 2), total_ms=_ms(t2 - t0)),
        )

    async def _chat_item(self, request: ChatCompletionRequest) -> tuple[GenerationItem, ResolvedProtein, float]:
        self.check_model(request.model)
        oa.refuse_unsupported(request)
        question = oa.question_from_messages(request.messages, self.config.limits)
        if request.protein is None:
            raise InvalidInput(
                "`protein` is required: send {\"protein\": {\"sequence\": ...}} or {\"protein\": {\"structure\": "
                "{\"format\": \"pdb\", \"data\": ...}}} in the request body (openai client: extra_body=...)",
                param="protein",
            )
        requested = request.max_completion_tokens or request.max_tokens
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        max_new = check_max_new_tokens(requested, self.config.limits, field)
        protein = await self._protein(request.protein)
        do_sample = None if request.temperature is None else request.temperature > 0
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        item = self._item(question, protein, max_new, do_sample, request.temperature or None, request.top_p, stop,
                          request.seed)
        return item, protein, time.perf_counter()

    async def chat(self, request: ChatCompletionRequest) -> dict:
        t0 = time.perf_counter()
        item, protein, _ = await self._chat_item(request)
        (result,) = await self._generate([item], self.config.request_timeout_s)
        extras = {"protein": self.protein_info(protein, [result]).model_dump(), "batch_size": result.batch_size,
                  "timings": {"queue_ms": round(result.queue_ms, 2), "generate_ms": round(result.generate_ms, 2),
                              "total_ms": _ms(time.perf_counter() - t0)}}
        return oa.completion(self.model_name, result, extras).model_dump()

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """SSE lines of a streamed chat completion; errors before the first token raise (-> JSON)."""
        item, protein, _ = await self._chat_item(request)
        budget = self.config.request_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        stream = self.runner.stream.options(stream=True).remote(item, budget)

        async def next_event() -> Optional[StreamEvent]:
            try:
                return await asyncio.wait_for(stream.__anext__(), timeout=max(deadline - loop.time(), 0.001))
            except StopAsyncIteration:
                return None

        try:
            first = await next_event()
        except asyncio.TimeoutError:
            stream.cancel()
            raise RequestTimeout(f"no answer within the request timeout of {budget:g} s", param="request_timeout_s") from None
        if first is not None and first.done:
            _raise_for_results([first.result], budget)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return oa.sse_stream(self.model_name, first, next_event, stream.cancel, include_usage,
                             extras_for=lambda r: {"protein": self.protein_info(protein, [r]).model_dump()})

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

    async def readiness(self) -> dict[str, Any]:
        try:
            state = await asyncio.wait_for(self.runner.ready_state.remote(), timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - any failure to reach a replica means "not ready"
            raise NotReady(f"no model replica answered: {type(exc).__name__}") from None
        if not state.get("warm"):
            raise NotReady("the model replica has not finished its warm-up generation")
        return {"status": "ready", "model": self.model_name, **state}

    async def runner_stats(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.runner.stats.remote(), timeout=10.0)


def _raise_for_results(results: list[GenerationResult], budget: float) -> None:
    if any(r.expired for r in results):
        raise RequestTimeout(f"the request waited past its timeout of {budget:g} s", param="request_timeout_s")
    failed = [r for r in results if r.error]
    if not failed:
        return
    broken = [r for r in failed if r.error.startswith("generation failed")]
    if broken:
        raise GenerationFailed(broken[0].error)
    refusal = next((r for r in failed if r.error_param), failed[0])
    raise InvalidInput(refusal.error, param=refusal.error_param)
