"""Prometheus metrics of the endpoint, recorded through Ray Serve's metrics API.

Instruments are ``ray.serve.metrics`` objects created inside the replicas, so Ray adds the
``application``, ``deployment`` and ``replica`` tags and exports them with its own metrics on
each node's metrics export port (Prometheus text at ``http://NODE:PORT/metrics``, the port
``ray start --metrics-export-port`` sets; a local Ray picks one, see
``ray._private.worker.global_worker.node.metrics_export_port``).  Ray prefixes every name with
``ray_`` and counters get ``_total``, so ``sepit_requests`` is scraped as
``ray_sepit_requests_total``.  Values reach the exporter every ``RAY_metrics_report_interval_ms``
(10 s by default).  Ray rebuilds histogram observations from bucket midpoints, so a histogram's
``_count`` and buckets are exact and its ``_sum`` approximate (exact for batch sizes up to 16).

HTTP side (:class:`IngressMetrics`, the ingress replica; tags ``route``, ``status``, ``model``):

* ``sepit_requests``: responses by route and status code (401s, 413s, ... included);
* ``sepit_request_errors``: the responses with status >= 400;
* ``sepit_request_duration_seconds``: request to last body byte (a whole stream when streaming).

Model side (:class:`RunnerMetrics`, each model replica's decode loop; tag ``model``):

* ``sepit_batch_size``: rows decoding together in each decode step (continuous batching);
* ``sepit_time_to_first_token_seconds``: from a row reaching the replica to its first token;
* ``sepit_queue_seconds``: from a row reaching the replica to its prefill;
* ``sepit_generated_tokens`` / ``sepit_prompt_tokens``: token counters (``rate()`` of the first is
  tokens per second over any window);
* ``sepit_tokens_per_second``: decode throughput over the last window of work (at least a second,
  or up to the loop going idle; it keeps its value while idle: use ``rate()`` of the counter for
  throughput over time);
* ``sepit_running_rows`` / ``sepit_waiting_rows``: rows in the decode batch / queued for it.
"""

from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

#: Request latency buckets (seconds): tens of ms (a 4xx) to minutes (a long stream).
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
#: Rows per decode step, as half-integer bounds: Ray (2.60) rebuilds a histogram's observations
#: from bucket midpoints, so ``le="8.5"`` = "at most 8 rows" and ``_sum`` stays exact up to 16 rows.
BATCH_BUCKETS = [k + 0.5 for k in range(17)] + [24.5, 32.5, 48.5, 64.5, 96.5, 128.5, 192.5, 256.5]
#: Routes reported by name; any other path is reported as ``other`` (bounded label values).
KNOWN_ROUTES = frozenset({
    "/v1/answer", "/v1/chat/completions", "/v1/models", "/v1/stats", "/healthz", "/readyz", "/docs",
    "/openapi.json",
})


def route_label(path: str) -> str:
    return path if path in KNOWN_ROUTES else "other"


class IngressMetrics:
    """HTTP request counters and latency of one ingress replica."""

    def __init__(self, model: str):
        from ray.serve import metrics

        tags = ("route", "status", "model")
        self.requests = metrics.Counter("sepit_requests", "HTTP responses by route and status code.", tags)
        self.errors = metrics.Counter("sepit_request_errors", "HTTP responses with status >= 400.", tags)
        self.duration = metrics.Histogram(
            "sepit_request_duration_seconds", "Time from the request to its last response byte.",
            LATENCY_BUCKETS, ("route", "model"),
        )
        for m in (self.requests, self.errors, self.duration):
            m.set_default_tags({"model": model})

    def response(self, path: str, status: int) -> None:
        tags = {"route": route_label(path), "status": str(status)}
        self.requests.inc(1, tags)
        if status >= 400:
            self.errors.inc(1, tags)

    def finished(self, path: str, seconds: float) -> None:
        self.duration.observe(seconds, {"route": route_label(path)})


class DecodeLoopMetrics:
    """What the decode loop reports (no-op base: a loop outside Serve records nothing)."""

    def admitted(self, queue_seconds: Sequence[float]) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def step(self, rows: int, new_tokens: int, seconds: float) -> None:
        pass

    def prompt_tokens(self, n: int) -> None:
        pass

    def occupancy(self, running: int, waiting: int) -> None:
        pass


class RunnerMetrics(DecodeLoopMetrics):
    """A model replica's decode-loop metrics (called from the loop's thread)."""

    #: Shortest window (seconds of wall time) over which ``sepit_tokens_per_second`` is averaged.
    THROUGHPUT_WINDOW_S = 1.0

    def __init__(self, model: str):
        from ray.serve import metrics

        tags = ("model",)
        self.batch_size = metrics.Histogram(
            "sepit_batch_size", "Rows decoding together in a decode step (continuous batching).", BATCH_BUCKETS, tags)
        self.ttft = metrics.Histogram(
            "sepit_time_to_first_token_seconds", "From a row reaching the model replica to its first token.",
            LATENCY_BUCKETS, tags)
        self.queue = metrics.Histogram(
            "sepit_queue_seconds", "From a row reaching the model replica to its prefill.", LATENCY_BUCKETS, tags)
        self.generated = metrics.Counter("sepit_generated_tokens", "Tokens generated.", tags)
        self.prompt = metrics.Counter("sepit_prompt_tokens", "Prompt tokens prefilled (protein span included).", tags)
        self.throughput = metrics.Gauge(
            "sepit_tokens_per_second",
            "Decode throughput over the last window of work (>= 1 s, or up to going idle); kept while idle.", tags)
        self.running = metrics.Gauge("sepit_running_rows", "Rows in the decode batch.", tags)
        self.waiting = metrics.Gauge("sepit_waiting_rows", "Rows queued for the decode batch.", tags)
        for m in (self.batch_size, self.ttft, self.queue, self.generated, self.prompt, self.throughput,
                  self.running, self.waiting):
            m.set_default_tags({"model": model})
        self._lock = threading.Lock()
        self._window_start: Optional[float] = None  # None while idle: a window starts with work
        self._window_tokens = 0
        self._last_occupancy = (-1, -1)

    def admitted(self, queue_seconds: Sequence[float]) -> None:
        for s in queue_seconds:
            self.queue.observe(max(s, 0.0))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(max(seconds, 0.0))

    def prompt_tokens(self, n: int) -> None:
        if n > 0:
            self.prompt.inc(n)

    def step(self, rows: int, new_tokens: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        if new_tokens > 0:
            self.generated.inc(new_tokens)
        with self._lock:
            now = time.monotonic()
            if self._window_start is None:
                self._window_start = now - seconds
            self._window_tokens += new_tokens
            elapsed = now - self._window_start
            if elapsed >= self.THROUGHPUT_WINDOW_S:
                self.throughput.set(self._window_tokens / elapsed)
                self._window_start, self._window_tokens = now, 0

    def occupancy(self, running: int, waiting: int) -> None:
        if (running, waiting) == self._last_occupancy:
            return
        self._last_occupancy = (running, waiting)
        self.running.set(running)
        self.waiting.set(waiting)
        if running == 0 and waiting == 0:  # idle: close the window (a burst under a second still shows)
            with self._lock:
                if self._window_start is not None and self._window_tokens:
                    self.throughput.set(self._window_tokens / max(time.monotonic() - self._window_start, 1e-6))
                self._window_start, self._window_tokens = None, 0
