"""Token ids -> text deltas while a generation runs (for server-sent events).

Decoding a growing id list and emitting only the new suffix is exact for byte-level BPE (the
text of a prefix is a prefix of the text) except while a multi-byte character is incomplete
(decoded as U+FFFD); such a tail is held back until the character completes.  With stop strings
the last ``len(longest stop) - 1`` characters are held back too, so a client never receives text
that a stop string later cuts off.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Optional, Sequence

REPLACEMENT = "\ufffd"


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(``text`` up to the earliest stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class IncrementalText:
    """Turns successive id lists of one row into the text not yet emitted."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emitted = ""

    def text(self, ids: Sequence[int]) -> tuple[str, bool]:
        return cut_at_stop(self.tokenizer.decode(list(ids), skip_special_tokens=True), self.stops)

    def update(self, ids: Sequence[int]) -> str:
        text, stopped = self.text(ids)
        safe = len(text)
        if not stopped:
            safe = len(text.rstrip(REPLACEMENT)) - self.hold
        if safe <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        delta = text[len(self.emitted):safe]
        self.emitted += delta
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` after what was emitted (empty if it diverged)."""
        if not final_text.startswith(self.emitted):
            return ""
        delta = final_text[len(self.emitted):]
        self.emitted = final_text
        return delta


class TokenSink:
    """Receives one row's ids from the generation thread and queues text deltas on the event loop.

    ``cancelled`` is set by the consumer (client gone, deadline passed); the generation loop then
    stops that row at its next token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, tokenizer, stops: Sequence[str] = ()):
        self.loop = loop
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.text = IncrementalText(tokenizer, stops)
        self.cancelled = threading.Event()

    def push(self, ids: Sequence[int]) -> None:
        """Called from the generation thread after each new token of this row."""
        delta = self.text.update(ids)
        if delta:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)

    def finish(self, final_text: str) -> Optional[str]:
        return self.text.finish(final_text)
