"""The normalised records every annotation reader produces.

Two kinds of input records exist:

* :class:`ProteinAnnotation`: what is known about one protein (UniProt entry, STRING row,
  DeepLoc label, ...), one field per SEPIT category.  The builder turns it into captions
  (stages 0/1) and into open and closed-set questions (stage 2).
* :class:`QAItem`: a ready-made question/answer pair (our QA JSONL, the reference's
  conversation JSONL, Mol-Instructions).  The builder imports it as is.

Both carry ``source_file`` and ``record`` (a locator such as ``line 12`` or ``entry 3``) so that
every input record can be reported as used or skipped with a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from sepit.errors import SepitError

#: Categories of instruction records (contract column ``category``).
CATEGORIES = (
    "function", "location", "family", "domains_motifs", "keywords", "go", "ec",
    "catalytic_activity", "caption", "other",
)
#: Task kinds (contract column ``task``).
TASKS = ("caption", "open", "yes_no", "multiple_choice")
#: Categories a ProteinAnnotation can fill (in the order questions are generated).
ANNOTATION_CATEGORIES = (
    "function", "location", "family", "domains_motifs", "keywords", "go", "ec", "catalytic_activity",
)

_EVIDENCE = re.compile(r"\s*\{ECO:[^}]*\}")
_SPACES = re.compile(r"\s+")
_DOUBLE_STOP = re.compile(r"\.\s*\.(?!\.)")


class AnnotationFormatError(SepitError, ValueError):
    """An annotation file or one of its records is malformed.

    ``line`` is a 1-based line number or a record locator (``"entry 3 (P12345)"``).
    """

    def __init__(self, file: str, line: Union[int, str, None], reason: str):
        self.file = str(file)
        self.line = line
        self.reason = reason
        where = self.file if line is None else (
            f"{self.file}:{line}" if isinstance(line, int) else f"{self.file} ({line})"
        )
        super().__init__(f"{where}: {reason}")

    @property
    def record(self) -> str:
        """The record locator in the same form readers use for ``record`` fields."""
        if self.line is None:
            return "file"
        return f"line {self.line}" if isinstance(self.line, int) else str(self.line)


def clean_text(text: Optional[str]) -> Optional[str]:
    """Drop UniProt evidence tags ``{ECO:...}``, collapse whitespace; None for empty text."""
    if text is None:
        return None
    # "family. {ECO:0000305}." -> "family.": the tag sat between two full stops.
    text = _DOUBLE_STOP.sub(".", _SPACES.sub(" ", _EVIDENCE.sub("", text))).strip()
    return text or None


def unique(items) -> list[str]:
    """Order-preserving de-duplication of non-empty strings."""
    out: list[str] = []
    for item in items:
        if item and item not in out:
            out.append(item)
    return out


@dataclass(frozen=True)
class GOTerm:
    id: str
    """GO identifier, ``GO:0005737``."""
    aspect: str
    """F (molecular function), P (biological process) or C (cellular component)."""
    term: str
    """Term name, ``cytoplasm``."""


@dataclass
class ProteinAnnotation:
    """Everything one input record says about one protein, normalised per category."""

    source: str
    """Source name, e.g. ``uniprot``, ``string``, ``deeploc``."""
    source_file: str
    record: str
    """Locator of the input record in ``source_file`` (``line 12``, ``entry 3 (P12345)``)."""
    accession: Optional[str] = None
    """UniProt accession (primary), when the source states it or an id map gives it."""
    sequence: Optional[str] = None
    """Full one-letter sequence as the source gives it (UniProt: the canonical isoform)."""
    name: Optional[str] = None
    """Recommended protein name."""
    organism: Optional[str] = None
    function: Optional[str] = None
    """Free-text function description (UniProt CC FUNCTION, STRING annotation); the caption."""
    locations: list[str] = field(default_factory=list)
    """Subcellular location labels, e.g. ``["Cytoplasm", "Cell membrane"]``."""
    location_text: Optional[str] = None
    """The source's full location sentence(s) (with topology), when richer than the labels."""
    family: Optional[str] = None
    """Family / similarity sentence, e.g. ``Belongs to the bZIP family. Fos subfamily.``"""
    domains_motifs: list[str] = field(default_factory=list)
    """Domain, repeat, zinc-finger and motif features, e.g. ``J (13-82)``."""
    keywords: list[str] = field(default_factory=list)
    go: list[GOTerm] = field(default_factory=list)
    ec: list[str] = field(default_factory=list)
    """EC numbers, ``2.3.1.74``."""
    catalytic_activity: list[str] = field(default_factory=list)
    """Reaction texts, e.g. ``4-coumaroyl-CoA + ... = ... + 4 CoA``."""
    external_id: Optional[str] = None
    """The source's own id when it is not an accession (STRING id, locus tag)."""

    @property
    def family_name(self) -> Optional[str]:
        """The family label inside the similarity sentence (``bZIP family``), for closed sets."""
        if not self.family:
            return None
        m = re.search(r"Belongs to the (.+?)(?:\.|$)", self.family)
        return m.group(1).strip() if m else None

    def labels(self, category: str) -> list[str]:
        """Short labels of ``category`` used for yes/no and multiple-choice questions."""
        if category == "location":
            return list(self.locations)
        if category == "family":
            name = self.family_name
            return [name] if name else []
        if category == "domains_motifs":
            # "J (13-82)" -> "J domain"-style labels: the feature name without its span.
            return unique(re.sub(r"\s*\(\d+(?:-\d+)?\)$", "", d) for d in self.domains_motifs)
        if category == "keywords":
            return list(self.keywords)
        if category == "go":
            return unique(t.term for t in self.go)
        if category == "ec":
            return list(self.ec)
        return []

    def has_content(self) -> bool:
        return bool(
            self.function or self.locations or self.location_text or self.family
            or self.domains_motifs or self.keywords or self.go or self.ec or self.catalytic_activity
        )


@dataclass
class QAItem:
    """A ready-made question/answer pair about one protein."""

    source: str
    source_file: str
    record: str
    question: str
    """The question text; ``<protein>`` is added by the builder when absent."""
    answer: str
    """Answer text.  Multiple choice: the bare option text (the builder adds the letter)."""
    task: str = "open"
    category: str = "other"
    accession: Optional[str] = None
    sequence: Optional[str] = None
    choices: Optional[list[str]] = None
    """Multiple-choice option texts in the order they are shown."""
    stage: int = 2
    """Which stage the pair belongs to (the reference's stage0/1 files give 0/1)."""
    structure_file: Optional[str] = None
    """File name of a structure the record names (QA JSONL), to join a store record by source."""
    structure_chain: Optional[str] = None
    item_id: Optional[str] = None
    """The record's own id in its source, when it has one."""


InputRecord = Union[ProteinAnnotation, QAItem]
