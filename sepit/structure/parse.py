"""One entry point for every supported file: ``parse_file`` / ``parse_bytes`` / ``parse_structure_text``.

None of them raises on bad input: a truncated, empty, binary, wrongly named or malformed file
comes back as a :class:`~sepit.structure.result.Reject` whose reason a person can act on.
``load_records`` is the raising variant (:class:`~sepit.structure.result.StructureError`).

Format: detected from the content (:func:`sepit.structure.formats.detect_format`); the extension
or an explicit ``fmt`` must agree with it only when ``strict_extension`` is set, otherwise the
content wins and ``meta["format_note"]`` records the disagreement.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from sepit.structure import formats
from sepit.structure.fasta import records_from_fasta_text
from sepit.structure.pdbx import ChainOptions, records_from_structure_text
from sepit.structure.record import ProteinRecord, sha256_bytes
from sepit.structure.reference_h5 import records_from_h5
from sepit.structure.result import ParseResult, Reject, StructureError

_FMT_ALIASES = {"pdb": "pdb", "ent": "pdb", "cif": "mmcif", "mmcif": "mmcif", "pdbx": "mmcif",
                "afdb": None, "fasta": "fasta", "fa": "fasta", "h5": "h5", "hdf5": "h5"}


@dataclass(frozen=True)
class ParseOptions:
    chain: Optional[str] = None
    """Keep only this chain (structure files); None = ``chain_policy``."""
    chain_policy: str = "all"
    """all | first: which protein chains of a structure file become records."""
    sequence_source: str = "seqres"
    """seqres | model (see :mod:`sepit.structure.pdbx`)."""
    max_residues: int = 100_000
    """Records longer than this are rejected as absurd."""
    max_file_bytes: int = 256 * 2**20
    """Files (and their decompressed content) larger than this are rejected."""
    strict_extension: bool = False
    """Reject files whose content format differs from their extension (default: content wins)."""

    def chain_options(self) -> ChainOptions:
        return ChainOptions(self.chain, self.chain_policy, self.sequence_source, self.max_residues)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed (pdb.h5 files can be many GB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _normalise_fmt(fmt: Optional[str]) -> Optional[str]:
    if fmt is None:
        return None
    key = fmt.lower().lstrip(".")
    if key not in _FMT_ALIASES:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(_FMT_ALIASES)}")
    return _FMT_ALIASES[key]


def _annotate(result: ParseResult, note: str) -> ParseResult:
    for rec in result.records:
        rec.meta["format_note"] = note
    return result


def parse_bytes(
    data: bytes, name: str, fmt: Optional[str] = None, options: ParseOptions = ParseOptions(),
    source: Optional[str] = None, checksum: Optional[str] = None,
) -> ParseResult:
    """Parse the bytes of a file called ``name`` (gzip allowed).  ``fmt`` is what the caller expects."""
    source = source if source is not None else name
    checksum = checksum if checksum is not None else sha256_bytes(data)
    try:
        expected = _normalise_fmt(fmt) if fmt else formats.format_from_name(name)
    except ValueError as exc:
        return ParseResult(rejects=[Reject(source, None, str(exc), "detect")])
    try:
        content = formats.decompress_limited(data, options.max_file_bytes)
        found, text = formats.detect_format(content, name)
    except formats.SourceError as exc:
        stage = "read" if "gzip" in str(exc) or "limit" in str(exc) else "detect"
        return ParseResult(rejects=[Reject(source, None, str(exc), stage)])
    note = None
    if expected is not None and expected != found:
        msg = f"{'format ' + fmt if fmt else 'extension'} says {expected} but the content is {found}"
        if options.strict_extension:
            return ParseResult(rejects=[Reject(source, None, f"wrong extension: {msg}", "detect")])
        note = msg
    entry = formats.entry_name(name)
    if found == "h5":
        result = records_from_h5(content, source, checksum, max_residues=options.max_residues)
    elif found == "fasta":
        result = records_from_fasta_text(text, source, checksum, options.max_residues)
    else:
        result = records_from_structure_text(text, found, entry, source, checksum, options.chain_options())
    return _annotate(result, note) if note else result


def parse_file(
    path: str | Path, chain: Optional[str] = None, fmt: Optional[str] = None,
    options: Optional[ParseOptions] = None, source: Optional[str] = None,
) -> ParseResult:
    """Parse one file into records + rejects; never raises on bad content.

    ``chain`` overrides ``options.chain``; ``source`` is what records/rejects name as their
    source (default: the path as given).
    """
    options = options or ParseOptions()
    if chain is not None:
        options = replace(options, chain=chain)
    path = Path(path)
    source = source if source is not None else str(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        return ParseResult(rejects=[Reject(source, None, f"cannot read file: {path} {what}", "read")])
    try:
        with path.open("rb") as fh:
            is_h5 = fh.read(len(formats.HDF5_MAGIC)) == formats.HDF5_MAGIC
        if is_h5:  # pdb.h5 files are large by design: read group by group, no size limit
            return records_from_h5(path, source, sha256_file(path), max_residues=options.max_residues)
        size = path.stat().st_size
        if size > options.max_file_bytes:
            raise formats.SourceError(
                f"file is {size / 2**20:.1f} MB, over the {options.max_file_bytes / 2**20:.0f} MB limit (max_file_mb)"
            )
        data = path.read_bytes()
    except (OSError, formats.SourceError) as exc:
        reason = str(exc) if isinstance(exc, formats.SourceError) else f"cannot read file: {exc.strerror or exc}"
        return ParseResult(rejects=[Reject(source, None, reason, "read")])
    return parse_bytes(data, path.name, fmt=fmt, options=options, source=source)


def parse_structure_text(
    text: str, fmt: str, name: str, chain: Optional[str] = None, options: Optional[ParseOptions] = None,
) -> ParseResult:
    """Parse in-memory PDB/mmCIF (or FASTA) text, e.g. an upload; ``name`` names the records."""
    options = options or ParseOptions()
    if chain is not None:
        options = replace(options, chain=chain)
    return parse_bytes(text.encode("utf-8"), name, fmt=fmt, options=options)


def load_records(path: str | Path, chain: Optional[str] = None, fmt: Optional[str] = None,
                 options: Optional[ParseOptions] = None) -> list[ProteinRecord]:
    """Records of one file; raises :class:`StructureError` naming the file when none is usable."""
    result = parse_file(path, chain=chain, fmt=fmt, options=options)
    if not result.records:
        raise StructureError("; ".join(str(r) for r in result.rejects) or f"{path}: no protein found")
    return result.records
