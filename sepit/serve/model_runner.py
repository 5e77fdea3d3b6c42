"""The model replica: loads an exported SEPIT folder, warms up, batches concurrent generations.

:class:`SepitModelRunner` is wrapped as a Ray Serve deployment by :mod:`sepit.serve.app` (one
model copy per replica, on CPU or one GPU).  Generation is batched at the level of decode steps
(:mod:`sepit.serve.batcher`): one background loop holds up to ``max_batch_size`` rows in flight,
admits newly arrived questions between two steps (an idle replica waits at most
``batch_wait_timeout_s`` for company) and answers each row the moment it ends.  Each question is
tokenised once, when the request is validated.  The replica counts requests, items, admissions
and decode steps with an admission-size histogram (``stats()``), which the API exposes at
``GET /v1/stats`` so tests and operators can see that concurrent requests really share steps.

Serve's ``user_config`` (``deployments: [{name: SepitModelRunner, user_config: {...}}]`` in a
Serve config file) reaches :meth:`SepitModelRunner.reconfigure`, which applies ``max_batch_size``,
``batch_wait_timeout_s`` and the generation defaults to the running replica: no restart, no
model reload (``ServeConfig.with_user_config``).  Options a request leaves unset are filled here
from the current defaults, so a change applies to the next request.  Decode-loop metrics go to
Prometheus through Ray Serve (:class:`~sepit.serve.metrics.RunnerMetrics`).

The replica never answers before it is warm: ``__init__`` runs a real generation through the
same loop as requests, so Serve only routes traffic to it once the model has produced an
answer.  The model runs in the loop's thread, so the replica's event loop keeps queueing new
requests (and answering health checks) while rows decode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, AsyncIterator, Optional

from ray import serve

from sepit.errors import SepitError
from sepit.serve.config import GenerationDefaults, ServeConfig
from sepit.serve.metrics import DecodeLoopMetrics
from sepit.serve.protocol import GenerationItem, GenerationResult, StreamEvent

if TYPE_CHECKING:
    from sepit.serve.batcher import DecodeRequest

# torch, transformers and the decode loop are imported inside the replica, not at module level:
# `serve deploy` imports this module in a build task only to name the deployment class.


class ModelLoadError(SepitError, RuntimeError):
    """The exported model folder cannot be loaded; the message names the folder and why."""


def load_exported_model(model_dir: str, device: str):
    """``(model, processor)`` of an exported folder: ``SepitForConditionalGeneration`` on
    ``device`` in eval mode, and its ``SepitProcessor``.

    ``model_dir`` may be an object-store URI (``s3://...``): each replica downloads it into its
    own node's cache (``sepit.storage.localize_dir``), so replicas on any node can load it."""
    from sepit.models.sepit_lm import SepitForConditionalGeneration
    from sepit.processing import SepitProcessor

    try:
        from sepit.tracking.models import localize_model  # also models:/NAME/VERSION, runs:/ID/model

        model_dir = str(localize_model(model_dir))
        model = SepitForConditionalGeneration.from_pretrained(model_dir)
        processor = SepitProcessor.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any failure here means "this folder is unusable"
        raise ModelLoadError(f"cannot load the SEPIT model in {model_dir}: {type(exc).__name__}: {exc}") from exc
    return model.to(device).eval(), processor


def pick_device(num_gpus: float) -> str:
    if num_gpus and num_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise ModelLoadError("num_gpus_per_replica=1 but this replica sees no CUDA device")
        return "cuda"
    return "cpu"


class RunnerStats:
    """Counters of one replica (thread-safe: updated from the generation thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0           # generate()/stream() calls that reached the replica
        self.items = 0              # questions received
        self.batches = 0            # admissions: groups of queued questions that joined the decode loop together
        self.generate_calls = 0     # prefill forward calls (one per length bucket of an admission)
        self.decode_steps = 0       # decode steps of the loop
        self.step_rows = 0          # rows summed over decode steps (/ decode_steps = mean rows per step)
        self.generated = 0          # items that were generated
        self.expired = 0            # items skipped because their deadline had passed
        self.refused = 0            # items refused before generation (bad prompt)
        self.failed = 0             # items whose generation raised
        self.completion_tokens = 0
        self.busy_s = 0.0           # wall time spent in prefills and decode steps
        self.batch_sizes: Counter[int] = Counter()  # admission sizes

    def reset(self) -> None:
        with self._lock:
            for name, value in vars(RunnerStats()).items():
                if not name.startswith("_"):
                    setattr(self, name, value)

    def add(self, **deltas) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def record_batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_sizes[size] += 1

    def snapshot(self) -> dict:
        with self._lock:
            out = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "batch_sizes"}
            out["batch_size_histogram"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
            out["max_batch_size_seen"] = max(self.batch_sizes, default=0)
            out["mean_rows_per_step"] = round(self.step_rows / self.decode_steps, 2) if self.decode_steps else 0.0
        return out


class SepitModelRunner:
    """One model replica (see the module docstring)."""

    def __init__(self, config: ServeConfig):
        self.base_config = config  # the application's args; user_config applies on top of these
        self.config = config
        self.user_config: Optional[dict] = None
        self.device = pick_device(config.num_gpus_per_replica)
        self.model, self.processor = load_exported_model(config.model_dir, self.device)
        self.tokenizer = self.processor.tokenizer
        self.stats_ = RunnerStats()
        self.warm = False
        from sepit.serve.batcher import ContinuousBatcher

        self.batcher = ContinuousBatcher(self.model, self.processor, config.max_batch_size,
                                         config.batch_wait_timeout_s, self.stats_)
        self.warmup_ms = self._warm_up()
        # Counters and metrics start after the warm-up (and its last step's bookkeeping): they describe traffic.
        self.batcher.wait_idle(timeout=60.0)
        self.stats_.reset()
        self.batcher.metrics = _replica_metrics(config.served_model_name)

    def reconfigure(self, user_config: dict) -> None:
        """Serve's ``user_config`` hook: apply batching and generation settings in place.

        Called after ``__init__`` and on every ``user_config`` change; a bad one raises
        ``ConfigError`` naming the field (Serve then reports the update as failed)."""
        config = self.base_config.with_user_config(user_config)
        self.batcher.configure(config.max_batch_size, config.batch_wait_timeout_s)
        self.config, self.user_config = config, dict(user_config or {})

    # ------------------------------------------------------------------ readiness
    def _warm_up(self) -> float:
        """Run one real generation; raise (so the replica never becomes ready) if it fails."""
        item = GenerationItem(
            question=self.config.warmup_question, sequence=self.config.warmup_sequence,
            max_new_tokens=min(8, self.config.generation.max_new_tokens),
        )
        t0 = time.perf_counter()
        refusal, request = self._request(item, 600.0)
        result = refusal or self.batcher.submit(request).result(timeout=600.0)
        if result.error:
            raise ModelLoadError(f"warm-up generation failed for {self.config.model_dir}: {result.error}")
        self.warm = True
        return (time.perf_counter() - t0) * 1000.0

    def ready_state(self) -> dict:
        return {"warm": self.warm, "warmup_ms": round(self.warmup_ms, 1), "device": self.device}

    def check_health(self) -> None:
        """Serve's periodic health check: an unhealthy replica is replaced."""
        if not self.warm:
            raise ModelLoadError("replica is not warm")
        if not self.batcher.alive:
            raise ModelLoadError("the replica's decode loop has stopped")

    def stats(self) -> dict:
        out = self.stats_.snapshot()
        out["max_batch_size"] = self.config.max_batch_size
        out["batch_wait_timeout_s"] = self.config.batch_wait_timeout_s
        out["generation"] = dataclasses.asdict(self.config.generation)
        out["user_config"] = self.user_config
        out["replica"] = _replica_id()
        out["warmup_ms"] = round(self.warmup_ms, 1)
        return out

    # ------------------------------------------------------------------ admission
    def _request(self, item: GenerationItem, budget_s: float, sink=None
                 ) -> tuple[Optional[GenerationResult], Optional["DecodeRequest"]]:
        """(refusal, None) when this model cannot take the item (checked alone, so a bad item never
        fails the rows it would have joined), else (None, a request for the decode loop).  The
        question is tokenised here, once."""
        from sepit.data.prompts import PromptError
        from sepit.models.protein_batch import ProteinBatchError

        item = with_defaults(item, self.config.generation, self.config.limits.max_new_tokens)
        try:
            prompt_ids = self.processor.encode_prompt(item.question)
        except PromptError as exc:
            return GenerationResult(error=str(exc), error_param="questions"), None
        try:
            protein = self.processor.protein_batch([(item.sequence, item.coords, item.coord_mask)])
        except ProteinBatchError as exc:
            return GenerationResult(error=f"protein: {str(exc).removeprefix('item 0: ')}", error_param="sequence"), None
        # LLM prompt length: template tokens + the protein span (<cls> residues <eos>, after the
        # model's inference crop) - the placeholder.
        prompt_tokens = len(prompt_ids) - 1 + int(protein.attention_mask.sum())
        now = time.monotonic()
        from sepit.serve.batcher import DecodeRequest

        return None, DecodeRequest(item, prompt_ids, prompt_tokens, now, now + budget_s, sink)

    async def _wait(self, request: "DecodeRequest") -> GenerationResult:
        try:
            return await asyncio.wrap_future(self.batcher.submit(request))
        finally:
            request.cancelled.set()  # no-op once answered; ends the row when the caller gave up

    async def generate(self, items: list[GenerationItem], budget_s: float) -> list[GenerationResult]:
        """Answer ``items`` (one request's questions) within ``budget_s`` seconds.

        If any item's prompt is unusable, nothing is generated for the request and every item
        carries an error (the ingress answers 422).
        """
        self.stats_.add(requests=1, items=len(items))
        checked = [self._request(it, budget_s) for it in items]
        if any(refusal for refusal, _ in checked):
            self.stats_.add(refused=sum(refusal is not None for refusal, _ in checked))
            return [refusal or GenerationResult(error="request refused") for refusal, _ in checked]
        return list(await asyncio.gather(*(self._wait(request) for _, request in checked)))

    async def stream(self, item: GenerationItem, budget_s: float) -> AsyncIterator[StreamEvent]:
        """Stream one generation as text deltas, then a final event with the counts.

        The item's row decodes alongside every other request's rows; its tokens reach the client
        as they are decoded.  If the client goes away, the row stops at its next step.
        """
        from sepit.serve.streaming import TokenSink

        self.stats_.add(requests=1, items=1)
        sink = TokenSink(asyncio.get_running_loop(), self.tokenizer, item.stop)
        refusal, request = self._request(item, budget_s, sink)
        if refusal:
            self.stats_.add(refused=1)
            yield StreamEvent(done=True, result=refusal)
            return
        task = asyncio.ensure_future(self._wait(request))
        try:
            while True:
                getter = asyncio.ensure_future(sink.queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                yield StreamEvent(delta=getter.result())
            while not sink.queue.empty():
                yield StreamEvent(delta=sink.queue.get_nowait())
            result = task.result()
            yield StreamEvent(delta=sink.finish(result.text) if not result.error else "", done=True, result=result)
        finally:
            sink.cancelled.set()  # no-op when finished; ends the row early when the client left


def with_defaults(item: GenerationItem, gen: GenerationDefaults, max_new_tokens_limit: int) -> GenerationItem:
    """``item`` with every option it left None taken from ``gen`` (the replica's current defaults)."""
    return dataclasses.replace(
        item,
        max_new_tokens=min(gen.max_new_tokens, max_new_tokens_limit) if item.max_new_tokens is None else item.max_new_tokens,
        do_sample=gen.do_sample if item.do_sample is None else item.do_sample,
        temperature=gen.temperature if item.temperature is None else item.temperature,
        top_p=gen.top_p if item.top_p is None else item.top_p,
    )


def _replica_metrics(model_name: str) -> DecodeLoopMetrics:
    """Prometheus metrics inside a Serve replica; a no-op recorder elsewhere (direct use, benchmarks)."""
    try:
        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not inside a Serve replica
        return DecodeLoopMetrics()
    from sepit.serve.metrics import RunnerMetrics

    return RunnerMetrics(model_name)


def _replica_id() -> Optional[str]:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a Serve replica (direct use in tests)
        return None
