"""What the HTTP ingress sends the model replicas and what comes back (plain, picklable data).

One :class:`GenerationItem` is one (protein, question) generation with its options; a
``/v1/answer`` request with three questions sends three items, which the replica's dynamic
decode loop runs alongside other requests' items (options are per item; options left None
take the replica's current generation defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class GenerationItem:
    question: str
    """Question text; holds ``<protein>`` at most once (prepended when absent)."""
    sequence: str
    """One-letter protein sequence, already validated."""
    coords: Optional[np.ndarray] = None
    """[n, 3] float32 Cα coordinates in Å, or None (sequence only)."""
    coord_mask: Optional[np.ndarray] = None
    """[n] bool, True where ``coords`` holds a real position."""
    max_new_tokens: Optional[int] = None
    """None: the replica's ``generation.max_new_tokens`` (its ``user_config`` may change it)."""
    do_sample: Optional[bool] = None
    """None: the replica's default; options left None are filled by the replica, so a change of
    its generation defaults through ``user_config`` applies without touching the ingress."""
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    """Seed of this row's own sampling generator: the same item and seed give the same tokens,
    whatever rows decode alongside it.  None: the replica's shared random stream."""


@dataclass
class GenerationResult:
    text: str = ""
    prompt_tokens: int = 0
    """LLM prompt tokens with the protein span counted as residues + 2 (<cls>, <eos>)."""
    completion_tokens: int = 0
    finish_reason: str = "stop"
    """``stop`` (end token or a stop string) or ``length`` (hit ``max_new_tokens``)."""
    batch_size: int = 0
    """Rows decoding together when this item joined the replica's decode loop."""
    queue_ms: float = 0.0
    generate_ms: float = 0.0
    structure_used: bool = False
    """Coordinates reached a structure-aware encoder (the model uses structure and the protein has some)."""
    error: Optional[str] = None
    """Set when this item was refused (e.g. a reserved token in the question); no text then."""
    error_param: Optional[str] = None
    """The request field the refusal is about (``questions``, ``sequence``)."""
    expired: bool = False
    """The deadline passed before generation started; the item was skipped (no model work)."""


@dataclass
class StreamEvent:
    """One step of a streamed generation: new text, then a final event with the counts."""

    delta: str = ""
    done: bool = False
    result: Optional[GenerationResult] = field(default=None)
