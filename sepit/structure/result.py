"""What parsing a file yields: kept records plus rejects with human-readable reasons.

Parsing never raises on bad input: a file or chain that cannot become a valid
:class:`~sepit.structure.record.ProteinRecord` becomes a :class:`Reject` naming the source, the
chain (when the problem is chain-specific) and the reason.  Callers that want an exception (the
serving layer, interactive use) call :meth:`ParseResult.raise_if_empty` or
:func:`sepit.structure.parse.load_records`, which raise :class:`StructureError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sepit.errors import SepitError
from sepit.structure.record import ProteinRecord

#: Where in the pipeline a reject happened (the ``stage`` column of ``rejects.parquet``).
REJECT_STAGES = ("read", "detect", "parse", "chain", "validate", "dedupe")


class StructureError(SepitError, ValueError):
    """A structure file (or uploaded text) yielded no usable protein; the message says why."""


@dataclass(frozen=True)
class Reject:
    source: str
    """The file (or upload name) the reject comes from."""
    chain: Optional[str]
    """Chain id (or FASTA/h5 record id) when the reject concerns one chain; None for the file."""
    reason: str
    """Human-readable reason, e.g. ``nucleic-acid chain (DNA) skipped: not a protein``."""
    stage: str = "parse"
    """One of :data:`REJECT_STAGES`."""

    def __str__(self) -> str:
        where = self.source if self.chain is None else f"{self.source} chain {self.chain}"
        return f"{where}: {self.reason}"

    def to_row(self) -> dict:
        return {"source": self.source, "chain": self.chain, "reason": self.reason, "stage": self.stage}


@dataclass
class ParseResult:
    records: list[ProteinRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    source_format: Optional[str] = None
    """Format detected from content (pdb | mmcif | afdb | fasta | h5) or None if undetectable."""

    def raise_if_empty(self) -> "ParseResult":
        """Raise :class:`StructureError` (listing every reason) when no record was kept."""
        if not self.records:
            reasons = "; ".join(str(r) for r in self.rejects) or "no protein found"
            raise StructureError(reasons)
        return self

    def extend(self, other: "ParseResult") -> None:
        self.records.extend(other.records)
        self.rejects.extend(other.rejects)
