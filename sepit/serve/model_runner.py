"""The model replica: loads an exported SEPIT folder, warms up, batches concurrent generations.

:class:`SepitModelRunner` is wrapped as a Ray Serve deployment by :mod:`sepit.serve.app` (one
model copy per replica, on CPU or one GPU).  Concurrent requests' questions meet in one queue;
``@serve.batch`` hands them over in groups of up to ``max_batch_size`` after at most
``batch_wait_timeout_s``, and each group runs as one left-padded, KV-cached decode per distinct
set of generation options.  The replica counts requests, items, batches and a batch-size histogram
(``stats()``), which the API exposes at ``GET /v1/stats`` so tests and operators can see that
concurrent requests really were grouped.

The replica never answers before it is warm: ``__init__`` runs a real generation through the
same code path as requests, so Serve only routes traffic to it once the model has produced an
answer.  Model code runs in a worker thread so the replica's event loop keeps queueing new
requests (and answering health checks) while a batch generates.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Optional

import torch

from ray import serve

from sepit.serve.config import ServeConfig
from sepit.serve.protocol import GenerationItem, GenerationResult, StreamEvent

if TYPE_CHECKING:
    from sepit.serve.streaming import TokenSink


@dataclass
class _Entry:
    """One queued generation: the item, when it arrived and its deadline (monotonic seconds)."""

    item: GenerationItem
    enqueued: float
    deadline: float
    sink: Optional["TokenSink"] = None
    """Streaming requests only: receives tokens as they are decoded."""


class ModelLoadError(RuntimeError):
    """The exported model folder cannot be loaded; the message names the folder and why."""


def load_exported_model(model_dir: str, device: str):
    """``SepitForConditionalGeneration.from_pretrained(model_dir)`` on ``device``, in eval mode."""
    from sepit.models.sepit_lm import SepitForConditionalGeneration

    try:
        model = SepitForConditionalGeneration.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any failure here means "this folder is unusable"
        raise ModelLoadError(f"cannot load the SEPIT model in {model_dir}: {type(exc).__name__}: {exc}") from exc
    return model.to(device).eval()


def pick_device(num_gpus: float) -> str:
    if num_gpus and num_gpus > 0:
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
        self.batches = 0            # dynamic batches handed over by @serve.batch
        self.generate_calls = 0     # batched decodes (one per option group of a batch)
        self.generated = 0          # items that were generated
        self.expired = 0            # items skipped because their deadline had passed
        self.refused = 0            # items refused before generation (bad prompt)
        self.failed = 0             # items whose generation raised
        self.completion_tokens = 0
        self.busy_s = 0.0           # wall time spent decoding
        self.batch_sizes: Counter[int] = Counter()

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
        return out


class SepitModelRunner:
    """One model replica (see the module docstring)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.device = pick_device(config.num_gpus_per_replica)
        self.model = load_exported_model(config.model_dir, self.device)
        self.tokenizer = self.model.tokenizer
        self.stats_ = RunnerStats()
        self._model_lock = threading.Lock()  # one generation at a time on this model copy
        self._generate_batched.set_max_batch_size(config.max_batch_size)
        self._generate_batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.warm = False
        self.warmup_ms = self._warm_up()
        self.stats_ = RunnerStats()  # counters start after the warm-up: they describe traffic

    # ------------------------------------------------------------------ readiness
    def _warm_up(self) -> float:
        """Run one real generation; raise (so the replica never becomes ready) if it fails."""
        item = GenerationItem(
            question=self.config.warmup_question, sequence=self.config.warmup_sequence,
            max_new_tokens=min(8, self.config.generation.max_new_tokens),
        )
        t0 = time.perf_counter()
        now = time.monotonic()
        (result,) = self._decode_group([_Entry(item, now, now + 600.0)])
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

    def stats(self) -> dict:
        out = self.stats_.snapshot()
        out["max_batch_size"] = self.config.max_batch_size
        out["batch_wait_timeout_s"] = self.config.batch_wait_timeout_s
        out["replica"] = _replica_id()
        return out

    # ------------------------------------------------------------------ token accounting
    def prompt_tokens(self, item: GenerationItem) -> int:
        """LLM prompt length: template tokens + the protein span (<cls> residues <eos>) - placeholder."""
        from sepit.data.prompts import encode_prompt

        return len(encode_prompt(self.tokenizer, item.question)) - 1 + len(item.sequence) + 2

    def _validate(self, item: GenerationItem) -> Optional[GenerationResult]:
        """A refusal when this model cannot take the item (checked alone, so a bad item never
        fails the batch it would have joined), else None."""
        from sepit.data.prompts import PromptError
        from sepit.models.protein_batch import ProteinBatchError, collate_proteins

        try:
            self.prompt_tokens(item)
        except PromptError as exc:
            return GenerationResult(error=str(exc), error_param="questions")
        try:
            collate_proteins(self.model.encoder.alphabet, [(item.sequence, item.coords, item.coord_mask)],
                             max_residues=self.model.config.max_residues)
        except ProteinBatchError as exc:
            return GenerationResult(error=f"protein: {str(exc).removeprefix('item 0: ')}", error_param="sequence")
        return None

    # ------------------------------------------------------------------ generation
    def _decode_group(self, entries: list[_Entry]) -> list[GenerationResult]:
        """One batched decode for entries that share their options (runs in a worker thread).

        Same maths as ``SepitForConditionalGeneration.generate`` (its input builder and decode
        loop); the per-token callback also feeds streaming sinks and ends rows whose client is
        gone or whose deadline passed.
        """
        from sepit.models.generation import SamplingConfig, decode_from_embeddings
        from sepit.serve.streaming import cut_at_stop

        head = entries[0].item
        stops = [s for s in head.stop if s]
        cut_short = [False] * len(entries)

        def on_token(row: int, ids: list[int]) -> bool:
            entry = entries[row]
            if entry.sink is not None:
                entry.sink.push(ids)
                if entry.sink.cancelled.is_set():
                    cut_short[row] = True
                    return True
            if time.monotonic() > entry.deadline:
                cut_short[row] = True
                return True
            if stops:
                return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stops)[1]
            return False

        t0 = time.perf_counter()
        try:
            with self._model_lock, torch.inference_mode():
                cfg = SamplingConfig(head.max_new_tokens, head.do_sample, head.temperature, head.top_p)
                s = self.model.build_generation_inputs(
                    [e.item.question for e in entries],
                    [(e.item.sequence, e.item.coords, e.item.coord_mask) for e in entries],
                )
                ids = decode_from_embeddings(
                    self.model, self.model.llm, s.inputs_embeds, s.attention_mask, s.position_ids,
                    self.model.token_ids.eos, self.model.token_ids.pad, cfg, on_token,
                )
        except Exception as exc:  # noqa: BLE001 - a failed batch answers its items, never kills the replica
            if len(entries) > 1:  # isolate the item that broke it: the others still get answers
                return [self._decode_group([entry])[0] for entry in entries]
            self.stats_.add(failed=1)
            return [GenerationResult(error=f"generation failed: {type(exc).__name__}: {exc}")]
        elapsed = time.perf_counter() - t0
        uses_structure = bool(self.model.config.encoder.use_structure)
        results = []
        for entry, row, short in zip(entries, ids, cut_short):
            text, _ = cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), stops)
            has_coords = entry.item.coord_mask is not None and bool(entry.item.coord_mask.any())
            results.append(GenerationResult(
                text=text, prompt_tokens=self.prompt_tokens(entry.item), completion_tokens=len(row),
                finish_reason="length" if len(row) >= head.max_new_tokens else "stop",
                generate_ms=elapsed * 1000.0, structure_used=uses_structure and has_coords,
                expired=short and (entry.sink is None or not entry.sink.cancelled.is_set()),
            ))
        self.stats_.add(generate_calls=1, generated=len(entries), busy_s=elapsed,
                        completion_tokens=sum(len(r) for r in ids))
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batched(self, entries: list[_Entry]) -> list[GenerationResult]:
        """A dynamic batch: skip expired entries, then one decode per distinct option set."""
        start = time.monotonic()
        self.stats_.record_batch(len(entries))
        results: list[Optional[GenerationResult]] = [None] * len(entries)
        groups: dict[tuple, list[int]] = {}
        for i, entry in enumerate(entries):
            if start >= entry.deadline or (entry.sink is not None and entry.sink.cancelled.is_set()):
                results[i] = GenerationResult(expired=True, error="deadline passed while queued")
                self.stats_.add(expired=1)
            else:
                groups.setdefault(entry.item.options_key(), []).append(i)
        for indices in groups.values():
            out = await asyncio.to_thread(self._decode_group, [entries[i] for i in indices])
            for i, res in zip(indices, out):
                results[i] = res
        for entry, res in zip(entries, results):
            res.batch_size = len(entries)
            res.queue_ms = (start - entry.enqueued) * 1000.0
        return results

    async def generate(self, items: list[GenerationItem], budget_s: float) -> list[GenerationResult]:
        """Answer ``items`` (one request's questions) within ``budget_s`` seconds.

        If any item's prompt is unusable, nothing is generated for the request and every item
        carries an error (the ingress answers 422).
        """
        self.stats_.add(requests=1, items=len(items))
        refusals = [self._validate(it) for it in items]
        if any(refusals):
            self.stats_.add(refused=sum(r is not None for r in refusals))
            return [r or GenerationResult(error="request refused") for r in refusals]
        now = time.monotonic()
        entries = [_Entry(it, now, now + budget_s) for it in items]
        return list(await asyncio.gather(*(self._generate_batched(e) for e in entries)))

    async def stream(self, item: GenerationItem, budget_s: float) -> AsyncIterator[StreamEvent]:
        """Stream one generation as text deltas, then a final event carrying the counts.

        The item joins the same dynamic batches as non-streamed requests; its tokens reach the
        client as they are decoded.  If the client goes away, the row stops at its next token.
        """
        from sepit.serve.streaming import TokenSink

        self.stats_.add(requests=1, items=1)
        refusal = self._validate(item)
        if refusal:
            self.stats_.add(refused=1)
            yield StreamEvent(done=True, result=refusal)
            return
        sink = TokenSink(asyncio.get_running_loop(), self.tokenizer, item.stop)
        now = time.monotonic()
        task = asyncio.ensure_future(self._generate_batched(_Entry(item, now, now + budget_s, sink)))
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


def _replica_id() -> Optional[str]:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a Serve replica (direct use in tests)
        return None
