"""What a ``sepit`` command shows on the console: one progress display per step and short
summaries; everything Ray, DeepSpeed, MLflow and other libraries print goes to ``RUN/logs/``.

Two parts:

* :class:`Progress` -- step k/n (or items done/total) with the caller's fields (loss, tok/s),
  elapsed and ETA.  On a terminal it is a tqdm bar redrawn in place; on a plain stream (CI,
  pipes, files) it writes one full line per update, at most every ``SEPIT_PROGRESS_EVERY_S``
  seconds (default 15) plus the last one, and never a carriage return.
* :func:`capture_logs` -- while it is open, the library loggers (``ray*``, ``deepspeed``,
  ``mlflow``, ``alembic``, ...) write to ``RUN/logs/<family>.log`` instead of the console, Ray's
  forwarded worker/actor output and raylet messages go to ``RUN/logs/ray-workers.log``, and
  Ray Data's own progress bars are off.  A record at ERROR level (or a worker line that starts a
  traceback or names an error) is still surfaced on the console as one line pointing at its log.
  ``sepit ... --verbose`` (:func:`set_verbose`) keeps everything on the console as well.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from sepit.ray_runtime import set_data_progress_bars, set_quiet_worker_env

#: Library logger families -> the log file under RUN/logs their records go to.
LOG_FAMILIES = {
    "ray": "ray.log", "deepspeed": "deepspeed.log", "DeepSpeed": "deepspeed.log", "torch": "torch.log",
    "mlflow": "mlflow.log", "alembic": "mlflow.log", "transformers": "run.log", "py.warnings": "run.log",
}
#: Everything else (the root logger: sepit's own detail lines and other libraries).
OTHER_LOG = "run.log"
WORKER_LOG = "ray-workers.log"
#: Worker/raylet lines worth one console line even when quiet: the exception line that ends a
#: traceback, an ERROR record, an OOM kill or a dead worker (not the traceback's frames).
_PROBLEM = re.compile(r"^(\(.*?\) )?\s*[\w.]*(Error|Exception)(\(.*?\))?:|\bERROR\b|out of memory|\bOOM\b|SIGKILL|"
                      r"died unexpectedly|worker .* (crashed|killed)")
#: Ray's prefix of a forwarded line: ``(TaskName pid=123, ip=...) message`` or ``(raylet) message``.
_WORKER_PREFIX = re.compile(r"^(?:\(([^)]*?)(?:\s*pid=\d+)?(?:, ip=[^)]*)?\)\s)?(.*)$", re.S)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

_verbose = os.environ.get("SEPIT_VERBOSE", "") not in ("", "0")
_active: "_Capture | None" = None
_lock = threading.Lock()


def set_verbose(on: bool) -> None:
    """``--verbose``: library and Ray output is shown on the console as well as logged."""
    global _verbose
    _verbose = bool(on)


def is_verbose() -> bool:
    return _verbose


def _out() -> TextIO:
    # The console stream as it is now (pytest's capsys or a redirect replaces sys.stdout).
    return sys.stdout


def say(line: str = "") -> None:
    """One project line on the console (step headers, summaries)."""
    out = _out()
    out.write(line + "\n")
    out.flush()


def interactive(stream: TextIO | None = None) -> bool:
    """A terminal that redraws a line in place; CI, pipes and files are not."""
    stream = stream or _out()
    if os.environ.get("SEPIT_PROGRESS", "") == "plain":
        return False
    try:
        return bool(stream.isatty()) and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _field(name: str, value: Any) -> str:
    if isinstance(value, float):
        if name.endswith("/s"):
            return f"{value:,.0f} {name}"
        return f"{name} {value:.4g}"
    return f"{name} {value}"


class Progress:
    """One progress display: ``label  k/n (p%)  fields  elapsed  ETA``.

    ``update(done, **fields)`` sets the position (absolute, so a resumed run starts where it
    is) and the fields shown after it (e.g. ``loss=2.31``, ``**{"tok/s": 1234.0}``).
    """

    def __init__(self, label: str, total: int | None, unit: str = "", *, stream: TextIO | None = None,
                 every_s: float | None = None, start: int | None = None, order: tuple[str, ...] = ()):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or _out()
        self.every_s = float(os.environ.get("SEPIT_PROGRESS_EVERY_S", "15")) if every_s is None else every_s
        self.t0 = time.time()
        self.done = 0
        # Where the rate for the ETA is counted from: ``start``, else the first update (a resumed run).
        self.start_done: int | None = start
        self.fields: dict[str, Any] = dict.fromkeys(order)  # display order; None = not known yet
        self._last_line = 0.0
        self._printed_done: int | None = None
        self._printed_fields: dict[str, Any] = {}
        self._bar = None
        if interactive(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=f" {unit}" if unit else "it", file=self.stream,
                             dynamic_ncols=True, leave=True,
                             bar_format="{desc} {bar} {n_fmt}/{total_fmt}{postfix} [{elapsed}<{remaining}]")

    def eta_s(self) -> float | None:
        if not self.total or self.start_done is None or self.done <= self.start_done:
            return None
        rate = (self.done - self.start_done) / max(time.time() - self.t0, 1e-9)
        return (self.total - self.done) / rate

    def line(self) -> str:
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        if self.unit:
            count = f"{self.unit} {count}" if self.unit == "step" else f"{count} {self.unit}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        fields = "".join(f"  {_field(k, v)}" for k, v in self.fields.items() if v is not None)
        eta = "" if self.total and self.done >= self.total else f"  ETA {_clock(self.eta_s())}"
        return f"  {self.label}  {count}{pct}{fields}  elapsed {_clock(time.time() - self.t0)}{eta}"

    def update(self, done: int, total: int | None = None, **fields: Any) -> None:
        if total is not None:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        if self.start_done is None:
            self.start_done = done if done < (self.total or 0) else 0
        self.done = done
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str("  ".join(_field(k, v) for k, v in self.fields.items() if v is not None),
                                      refresh=False)
            self._bar.refresh()
            return
        now = time.time()
        finished = bool(self.total) and done >= self.total
        # The finished line waits for close(): a last validation result may still join it.
        if now - self._last_line >= self.every_s and not finished and self._printed_done != done:
            self._last_line = now
            self._write()

    def _write(self) -> None:
        self._printed_done = self.done
        self._printed_fields = dict(self.fields)
        self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the display; a plain stream gets the last state if it was not printed yet."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._printed_done is not None or self.done:
            if (self._printed_done, self._printed_fields) != (self.done, self.fields):
                self._write()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_named: dict[str, Progress] = {}


def report(label: str, done: int, total: int | None, unit: str = "items", **fields: Any) -> None:
    """Callback-style progress (``on_batch(done, total)``): one display per ``label``, closed
    when ``done`` reaches ``total``; a count that goes back to 0 starts a new display."""
    bar = _named.get(label)
    if bar is not None and done < bar.done:
        bar.close()
        bar = None
    if bar is None:
        # Work done before the first report is not in the rate: the ETA waits for a second one.
        bar = _named[label] = Progress(label, total, unit, start=0 if done == 0 else None)
    bar.update(done, total, **fields)
    if total and done >= total:
        bar.close()
        _named.pop(label, None)


# --------------------------------------------------------------------------- log capture
class _ConsoleProblemHandler(logging.Handler):
    """ERROR records of the captured loggers: one console line naming the log file."""

    def __init__(self, log_file: Path):
        super().__init__(level=logging.ERROR)
        self.log_file = log_file

    def emit(self, record: logging.LogRecord) -> None:
        try:
            first = record.getMessage().strip().splitlines()[0][:200] if record.getMessage().strip() else ""
            say(f"  ! {record.name}: {first}  (details: {self.log_file})")
        except Exception:  # noqa: BLE001 - a console line must never break the run
            self.handleError(record)


def _is_console_handler(h: logging.Handler) -> bool:
    """A handler that writes to the terminal: every stream handler but files (MLflow's wraps
    stderr in its own stream; pytest's capture handlers are left alone)."""
    if isinstance(h, (logging.FileHandler, _ConsoleProblemHandler)) or type(h).__module__.startswith("_pytest"):
        return False
    return isinstance(h, logging.StreamHandler) or type(h).__name__ in ("PlainRayHandler", "_StderrHandler")


class _Capture:
    def __init__(self, log_dir: Path, verbose: bool):
        self.log_dir = log_dir
        self.verbose = verbose
        self.files: dict[str, logging.FileHandler] = {}
        self.saved: dict[str, tuple[list[logging.Handler], bool, int]] = {}
        self.root_saved: list[logging.Handler] = []
        self.worker_file: TextIO | None = None
        self.worker_lock = threading.Lock()
        self.surfaced: set[str] = set()
        self.original_print = None
        self.saved_env: dict[str, str | None] = {}
        self.saved_data_bars: bool | None = None

    def handler(self, name: str) -> logging.FileHandler:
        if name not in self.files:
            h = logging.FileHandler(self.log_dir / name, encoding="utf-8")
            h.setLevel(logging.INFO)  # Ray Data logs DEBUG (MBs of operator stats) to its own session file
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self.files[name] = h
        return self.files[name]

    def reroute(self) -> None:
        """Point every library logger with a console handler (and the families) at its file;
        safe to call again when a library configured its loggers after the capture began."""
        names = set(LOG_FAMILIES) | {n for n in logging.root.manager.loggerDict
                                     if isinstance(logging.root.manager.loggerDict[n], logging.Logger)}
        for name in sorted(names):
            if name.startswith("sepit"):
                continue
            logger = logging.getLogger(name)
            family = LOG_FAMILIES.get(name) or LOG_FAMILIES.get(name.split(".")[0])
            is_family_root = name in LOG_FAMILIES
            consoles = [h for h in logger.handlers if _is_console_handler(h)]
            if not consoles and not is_family_root:
                continue  # it propagates to its family or the root, both captured
            if name not in self.saved:
                self.saved[name] = (list(logger.handlers), logger.propagate, logger.level)
            file_h = self.handler(family or OTHER_LOG)
            keep = [h for h in logger.handlers
                    if not isinstance(h, _ConsoleProblemHandler) and (self.verbose or not _is_console_handler(h))]
            if file_h not in keep:
                keep.append(file_h)
            if not self.verbose:
                keep.append(_ConsoleProblemHandler(self.log_dir / (family or OTHER_LOG)))
            logger.handlers = keep
            logger.propagate = False
            if is_family_root and logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)  # the file keeps INFO; the console shows none of it

    def worker_lines(self, data: dict, ignore_prefix: bool = False) -> None:
        """Ray's ``print_worker_logs`` replacement: the exact lines Ray would print, to the file."""
        buf = io.StringIO()
        self.original_print(data, buf, ignore_prefix)
        text = _ANSI.sub("", buf.getvalue())
        if not text:
            return
        with self.worker_lock:
            if self.worker_file is not None:
                self.worker_file.write(text)
                self.worker_file.flush()
        if self.verbose:
            self.original_print(data, sys.stderr if data.get("is_err") else sys.stdout, ignore_prefix)
            return
        for line in text.splitlines():
            if _PROBLEM.search(line):
                key = re.sub(r"\d+", "#", line)[:120]
                if key not in self.surfaced:  # one line per kind of problem, not a flood
                    self.surfaced.add(key)
                    who, msg = _WORKER_PREFIX.match(line).groups()
                    who = (who or "").strip() or "ray"
                    say(f"  ! {who}: {msg.strip()[:200]}  (details: {self.log_dir / WORKER_LOG})")

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.verbose:
            self.saved_env = set_quiet_worker_env()  # set before a local Ray node starts
        logging.captureWarnings(True)
        sepit_logger = logging.getLogger("sepit")
        self.sepit_level = sepit_logger.level
        if sepit_logger.level == logging.NOTSET:
            sepit_logger.setLevel(logging.INFO)  # sepit's detail lines reach the file
        self.root_saved = list(logging.root.handlers)
        keep = [h for h in logging.root.handlers if not _is_console_handler(h) or self.verbose]
        logging.root.handlers = keep + [self.handler(OTHER_LOG)] + (
            [] if self.verbose else [_ConsoleProblemHandler(self.log_dir / OTHER_LOG)])
        import ray  # noqa: F401 - its logger config is made at import: reroute it now
        import ray._private.worker as ray_worker

        self.worker_file = (self.log_dir / WORKER_LOG).open("a", encoding="utf-8")
        self.original_print = ray_worker.print_worker_logs
        ray_worker.print_worker_logs = self._patched
        if not self.verbose:
            self.saved_data_bars = set_data_progress_bars(False)
        self.reroute()

    def _patched(self, data: dict, print_file: Any, ignore_prefix: bool = False) -> None:
        self.worker_lines(data, ignore_prefix)

    def stop(self) -> None:
        import ray._private.worker as ray_worker

        if ray_worker.print_worker_logs == self._patched:
            ray_worker.print_worker_logs = self.original_print
        for name, (handlers, propagate, level) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        logging.root.handlers = self.root_saved
        logging.getLogger("sepit").setLevel(self.sepit_level)
        logging.captureWarnings(False)
        if self.saved_data_bars is not None:
            set_data_progress_bars(self.saved_data_bars)
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
        for h in self.files.values():
            h.close()
        with self.worker_lock:
            if self.worker_file is not None:
                self.worker_file.close()
                self.worker_file = None


@contextlib.contextmanager
def capture_logs(run_dir: str | Path) -> Iterator[Path]:
    """Send library and Ray output to ``<run_dir>/logs/`` while open (see the module doc).

    Nested calls (a pipeline step inside the pipeline) keep the outer folder.  Yields the
    logs folder in use.
    """
    global _active
    with _lock:
        outer = _active
        if outer is None:
            _active = _Capture(Path(run_dir).absolute() / "logs", _verbose)
            _active.start()
    if outer is not None:
        outer.reroute()
        yield outer.log_dir
        return
    try:
        yield _active.log_dir
    finally:
        with _lock:
            _active.stop()
            _active = None


def rerouted() -> None:
    """Re-apply the capture to loggers a library created since it began (e.g. after MLflow or
    DeepSpeed configured theirs); a no-op when nothing is captured."""
    if _active is not None:
        _active.reroute()


def logs_dir() -> Path | None:
    """The ``RUN/logs`` folder of the open capture, if any."""
    return _active.log_dir if _active is not None else None
