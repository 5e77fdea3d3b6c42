"""Iteration-level (continuous) batching: one decode loop that admits requests between steps.

A replica runs one background thread around a :class:`~sepit.models.generation.DecodeBatch`.
Each turn of the loop it

1. admits queued requests (up to ``max_batch_size`` rows in flight): their prompts are prefilled
   in length buckets (little left padding) and their rows join the running batch;
2. picks one token for every row (greedy rows argmax, sampling rows their own temperature/top-p;
   a row with a ``seed`` draws from its own generator, so its tokens do not depend on which
   rows share its steps);
3. ends rows at eos, ``max_new_tokens``, a stop string, their deadline or a client that left,
   answers them at once and drops them from the batch (they cost nothing afterwards);
4. runs one decode step for the rows left.

So a request never waits for a whole batch to finish, and a short answer never pays for a long
neighbour.  Requests arrive from the replica's event loop (:meth:`ContinuousBatcher.submit`);
results go back through ``concurrent.futures.Future`` objects.  :meth:`ContinuousBatcher.configure`
changes the batch limit and admission wait of the running loop (Serve ``user_config``); the loop
reports batch sizes, time to first token and tokens to a
:class:`~sepit.serve.metrics.DecodeLoopMetrics` (Prometheus through Ray Serve in a replica).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from sepit.models.generation import DecodeBatch, length_buckets, sample_tokens
from sepit.serve.metrics import DecodeLoopMetrics
from sepit.serve.protocol import GenerationItem, GenerationResult
from sepit.serve.streaming import cut_at_stop

if TYPE_CHECKING:
    from sepit.serve.model_runner import RunnerStats
    from sepit.serve.streaming import TokenSink

@dataclass
class DecodeRequest:
    """One generation in the loop: what to generate, its deadline and where the answer goes."""

    item: GenerationItem
    prompt_ids: list[int]
    """``SepitProcessor.encode_prompt`` of the question, computed once when the request was validated."""
    prompt_tokens: int
    enqueued: float
    deadline: float
    """Monotonic seconds; past it the row ends (and the request answers 504)."""
    sink: Optional["TokenSink"] = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the caller gave up (its request was cancelled): the row ends at its next step."""
    ids: list[int] = field(default_factory=list)
    admitted: float = 0.0
    batch_size: int = 0
    generator: Optional[torch.Generator] = None
    """This row's sampling generator (seeded with ``item.seed`` at its first sampled token)."""

    @property
    def length(self) -> int:
        """LLM prompt length (protein span included) used to bucket prefills."""
        return self.prompt_tokens

    def gone(self) -> bool:
        return self.cancelled.is_set() or (self.sink is not None and self.sink.cancelled.is_set())


class ContinuousBatcher:
    """The replica's decode loop (see the module docstring); one model, one thread."""

    def __init__(self, model, processor, max_batch_size: int, admit_wait_s: float, stats: "RunnerStats",
                 metrics: Optional[DecodeLoopMetrics] = None) -> None:
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.admit_wait_s = admit_wait_s
        self.stats = stats
        self.metrics = metrics or DecodeLoopMetrics()
        self.tokenizer = processor.tokenizer
        self.eos = model.token_ids.eos
        self._pending: collections.deque[DecodeRequest] = collections.deque()
        self._cv = threading.Condition()
        self._idle = threading.Event()  # set while the loop waits with nothing queued or in flight
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sepit-decode-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the caller's side
    def submit(self, request: DecodeRequest) -> concurrent.futures.Future:
        with self._cv:
            if self._stopped:
                raise RuntimeError("the decode loop has stopped")
            self._pending.append(request)
            self._idle.clear()
            self._cv.notify()
        return request.future

    def wait_idle(self, timeout: float) -> bool:
        """Block until the loop has answered everything and finished its bookkeeping (True), or
        ``timeout`` seconds passed (False)."""
        return self._idle.wait(timeout)

    def configure(self, max_batch_size: int, admit_wait_s: float) -> None:
        """Change the limits of the running loop; rows in flight finish, the next admission obeys."""
        with self._cv:
            self.max_batch_size = max_batch_size
            self.admit_wait_s = admit_wait_s
            self._cv.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop
    def _take(self, active: int) -> Optional[list[DecodeRequest]]:
        """Queued requests to admit now (blocks while nothing is in flight); None once stopped."""
        with self._cv:
            while not self._pending and not active and not self._stopped:
                self._idle.set()
                self._cv.wait()
            if self._stopped:
                return None
            if not active and self.admit_wait_s > 0:
                # An idle replica waits a little for company, so one prefill serves several arrivals.
                until = time.monotonic() + self.admit_wait_s
                while len(self._pending) < self.max_batch_size and not self._stopped:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            n = max(min(len(self._pending), self.max_batch_size - active), 0)  # the limit may have shrunk
            return [self._pending.popleft() for _ in range(n)]

    def _run(self) -> None:
        batch: Optional[DecodeBatch] = None
        rows: list[DecodeRequest] = []
        while True:
            new = self._take(len(rows))
            if new is None:
                for req in rows:
                    self._answer(req, error="the replica is shutting down")
                return
            try:
                # One mode for every tensor of the loop: in-place cache writes need it consistent.
                with torch.inference_mode():
                    batch, rows = self._admit(batch, rows, new)
                    if rows:
                        batch, rows = self._step(batch, rows)
            except Exception as exc:  # noqa: BLE001 - a broken step fails its rows, never the loop
                for req in rows:
                    self.stats.add(failed=1)
                    self._answer(req, error=f"generation failed: {type(exc).__name__}: {exc}")
                batch, rows = None, []
            self._report_occupancy(len(rows))

    def _report_occupancy(self, running: int) -> None:
        try:
            self.metrics.occupancy(running, len(self._pending))
        except Exception:  # noqa: BLE001 - metrics must never stop the decode loop
            pass

    def _admit(self, batch, rows, new):
        now = time.monotonic()
        live = []
        for req in new:
            if now >= req.deadline or req.gone():
                self.stats.add(expired=1)
                self._answer(req, error="deadline passed while queued", expired=True, queue_end=now)
            else:
                live.append(req)
        if not live:
            return batch, rows
        self.stats.record_batch(len(live))
        for bucket in length_buckets([r.length for r in live]):
            group = [live[i] for i in bucket]
            joined = self._prefill(group)
            if joined is None:
                continue
            part, ok = joined
            if batch is None:
                batch, rows = part, list(ok)
            else:
                batch.concat(part, headroom=max(r.item.max_new_tokens for r in rows + ok))
                rows = rows + ok
        for req in live:
            req.batch_size = len(rows)
        prefilled = [r for r in live if r.admitted]
        self.metrics.admitted([r.admitted - r.enqueued for r in prefilled])
        self.metrics.prompt_tokens(sum(r.prompt_tokens for r in prefilled))
        return batch, rows

    def _prefill(self, group: list[DecodeRequest]):
        """(DecodeBatch, its requests) for ``group``; a failing group is retried one by one."""
        t0 = time.monotonic()
        try:
            s = self.model.build_generation_inputs(**self.processor.generation_inputs(
                [r.item.question for r in group],
                [(r.item.sequence, r.item.coords, r.item.coord_mask) for r in group],
                prompt_ids=[r.prompt_ids for r in group],
            ))
            part = DecodeBatch.prefill(self.model, self.model.llm, s.inputs_embeds, s.attention_mask,
                                       s.position_ids, max(r.item.max_new_tokens for r in group))
        except Exception as exc:  # noqa: BLE001 - isolate the item that broke it
            if len(group) > 1:
                parts = [p for p in (self._prefill([r]) for r in group) if p is not None]
                if not parts:
                    return None
                head, ok = parts[0]
                ok = list(ok)
                for p, reqs in parts[1:]:
                    head.concat(p, headroom=max(r.item.max_new_tokens for r in group))
                    ok += reqs
                return head, ok
            self.stats.add(failed=1)
            self._answer(group[0], error=f"generation failed: {type(exc).__name__}: {exc}")
            return None
        for r in group:
            r.admitted = t0
        self.stats.add(generate_calls=1, busy_s=time.monotonic() - t0)
        return part, group

    def _pick(self, batch: DecodeBatch, rows: list[DecodeRequest]) -> list[int]:
        logits = batch.logits.float()  # softmax and argmax in fp32
        tokens = logits.argmax(-1)
        sampled = [i for i, r in enumerate(rows) if r.item.do_sample]
        if not sampled:
            return tokens.tolist()

        def options(picked: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.tensor([rows[i].item.temperature for i in picked], device=logits.device),
                    torch.tensor([rows[i].item.top_p for i in picked], device=logits.device))

        shared = [i for i in sampled if rows[i].item.seed is None]
        if shared:  # unseeded rows: one draw from the process's random stream
            idx = torch.tensor(shared, device=logits.device)
            tokens[idx] = sample_tokens(logits[idx], *options(shared), None)
        for i in sampled:
            req = rows[i]
            if req.item.seed is None:
                continue
            if req.generator is None:
                req.generator = torch.Generator(device=logits.device).manual_seed(req.item.seed)
            # One draw per step from the row's own generator: reproducible whatever its neighbours.
            tokens[i] = sample_tokens(logits[i:i + 1], *options([i]), req.generator)[0]
        return tokens.tolist()

    def _step(self, batch: DecodeBatch, rows: list[DecodeRequest]):
        t0 = time.monotonic()
        tokens = self._pick(batch, rows)
        picked = time.monotonic()
        stepped, new_tokens = len(rows), sum(tok != self.eos for tok in tokens)
        for req in rows:
            if not req.ids:
                self.metrics.first_token(picked - req.enqueued)
        keep: list[int] = []
        for i, (req, tok) in enumerate(zip(rows, tokens)):
            if tok == self.eos:
                self._finish(req, "stop")
                continue
            req.ids.append(tok)
            if req.sink is not None:
                req.sink.push(req.ids)
            if req.gone():
                self._finish(req, "stop", cut_short=True)
            elif t0 > req.deadline:
                self._finish(req, "length", expired=True)
            elif req.item.stop and cut_at_stop(self.tokenizer.decode(req.ids, skip_special_tokens=True),
                                               req.item.stop)[1]:
                self._finish(req, "stop")
            elif len(req.ids) >= req.item.max_new_tokens:
                self._finish(req, "length")
            else:
                keep.append(i)
        if not keep:
            self.stats.add(decode_steps=1, step_rows=len(rows), busy_s=time.monotonic() - t0)
            self.metrics.step(stepped, new_tokens, time.monotonic() - t0)
            return None, []
        batch.keep(keep)
        rows = [rows[i] for i in keep]
        batch.step(torch.tensor([tokens[i] for i in keep], dtype=torch.long, device=batch.mask.device))
        self.stats.add(decode_steps=1, step_rows=len(rows), busy_s=time.monotonic() - t0)
        self.metrics.step(stepped, new_tokens, time.monotonic() - t0)
        return batch, rows

    # ------------------------------------------------------------------ answers
    def _finish(self, req: DecodeRequest, reason: str, expired: bool = False, cut_short: bool = False) -> None:
        text, _ = cut_at_stop(self.tokenizer.decode(req.ids, skip_special_tokens=True), req.item.stop)
        self.stats.add(generated=1, completion_tokens=len(req.ids))
        self._answer(req, text=text, finish_reason=reason, expired=expired and not cut_short)

    def _answer(self, req: DecodeRequest, text: str = "", finish_reason: str = "stop", error: Optional[str] = None,
                expired: bool = False, queue_end: Optional[float] = None) -> None:
        now = time.monotonic()
        admitted = req.admitted or queue_end or now
        has_coords = req.item.coord_mask is not None and bool(req.item.coord_mask.any())
        result = GenerationResult(
            text=text, prompt_tokens=req.prompt_tokens, completion_tokens=len(req.ids), finish_reason=finish_reason,
            batch_size=req.batch_size, queue_ms=(admitted - req.enqueued) * 1000.0,
            generate_ms=(now - admitted) * 1000.0 if req.admitted else 0.0,
            structure_used=bool(self.model.config.encoder.use_structure) and has_coords,
            error=error, expired=expired,
        )
        if not req.future.done():
            req.future.set_result(result)
