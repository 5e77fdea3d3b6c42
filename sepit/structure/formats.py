"""File formats: names by extension, detection by content, and size-limited (gzip) reading.

The content decides the format when it is unambiguous (a PDB file saved as ``.cif`` is read as
PDB); the extension only breaks ties and names what the user expected.  Content that matches no
supported format is rejected with a reason that quotes what the file starts with.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import Optional

from sepit.errors import SepitError

#: Formats a file can hold; ``afdb`` is decided after parsing (an AlphaFold DB PDB/mmCIF model).
FILE_FORMATS = ("pdb", "mmcif", "fasta", "h5")

#: Extension (lower case, without ``.gz``) -> format.
EXTENSIONS = {
    ".pdb": "pdb", ".ent": "pdb",
    ".cif": "mmcif", ".mmcif": "mmcif",
    ".fasta": "fasta", ".fa": "fasta", ".faa": "fasta", ".fas": "fasta",
    ".h5": "h5", ".hdf5": "h5",
}

GZIP_MAGIC = b"\x1f\x8b"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_BINARY_MAGICS = {
    b"\x89PNG": "a PNG image", b"%PDF": "a PDF document", b"PK\x03\x04": "a ZIP archive",
    b"BZh": "bzip2-compressed data (unsupported; use gzip)", b"\xfd7zXZ": "xz-compressed data (unsupported; use gzip)",
    b"\x7fELF": "an executable", b"\xff\xd8\xff": "a JPEG image",
}
#: PDB record names that may open a PDB file (headerless files start at ATOM/MODEL/CRYST1).
PDB_RECORDS = frozenset(
    "HEADER OBSLTE TITLE SPLIT CAVEAT COMPND SOURCE KEYWDS EXPDTA NUMMDL MDLTYP AUTHOR REVDAT "
    "SPRSDE JRNL REMARK DBREF DBREF1 DBREF2 SEQADV SEQRES MODRES HET HETNAM HETSYN FORMUL HELIX "
    "SHEET SSBOND LINK CISPEP SITE CRYST1 ORIGX1 ORIGX2 ORIGX3 SCALE1 SCALE2 SCALE3 MTRIX1 MTRIX2 "
    "MTRIX3 MODEL ATOM ANISOU TER HETATM ENDMDL CONECT MASTER END".split()
)


class SourceError(SepitError, ValueError):
    """The bytes of a source cannot be read as any supported format; message = the reason."""


def strip_compression_suffix(name: str) -> tuple[str, bool]:
    """``"x.cif.gz"`` -> (``"x.cif"``, True)."""
    if name.lower().endswith(".gz"):
        return name[:-3], True
    return name, False


def format_from_name(name: str) -> Optional[str]:
    base, _ = strip_compression_suffix(name)
    return EXTENSIONS.get(Path(base).suffix.lower())


def entry_name(name: str) -> str:
    """File name without directories, ``.gz`` and the format extension: ``1AKI.pdb.gz`` -> ``1AKI``."""
    base, _ = strip_compression_suffix(Path(name).name)
    stem, suffix = Path(base).stem, Path(base).suffix.lower()
    return stem if suffix in EXTENSIONS else Path(base).name


def read_limited(path: Path, max_bytes: int) -> bytes:
    """Read ``path`` (gunzipping when its content is gzip) refusing more than ``max_bytes``.

    The limit applies to the compressed file and again to the decompressed content (a small
    gzip can expand enormously).  Raises :class:`SourceError` with the reason.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SourceError(f"cannot read file: {exc.strerror or exc}") from None
    if size > max_bytes:
        raise SourceError(f"file is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit (max_file_mb)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read file: {exc.strerror or exc}") from None
    return decompress_limited(raw, max_bytes)


def decompress_limited(raw: bytes, max_bytes: int) -> bytes:
    """Gunzip ``raw`` if it starts with the gzip magic; refuse content over ``max_bytes``."""
    if not raw.startswith(GZIP_MAGIC):
        return raw
    out = io.BytesIO()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as fh:
            while True:
                chunk = fh.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                if out.tell() > max_bytes:
                    raise SourceError(f"decompressed content exceeds the {max_bytes / 2**20:.0f} MB limit (max_file_mb)")
    except (EOFError, OSError, zlib.error) as exc:
        raise SourceError(f"corrupt or truncated gzip data ({exc})") from None
    return out.getvalue()


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def detect_format(data: bytes, name: str = "") -> tuple[str, str]:
    """(format, text) of decompressed ``data``; raises :class:`SourceError` with the reason.

    ``text`` is the decoded content ("" for HDF5).  ``name`` only breaks ties (never needed for
    the formats here) and makes messages concrete.
    """
    if not data.strip():
        raise SourceError("empty file")
    if data.startswith(HDF5_MAGIC):
        return "h5", ""
    if data.startswith(GZIP_MAGIC):
        raise SourceError("gzip data inside gzip data (doubly compressed); decompress it once")
    for magic, what in _BINARY_MAGICS.items():
        if data.startswith(magic):
            raise SourceError(f"binary content: the file is {what}, not a structure or sequence file")
    head = data[:65536]
    if b"\x00" in head:
        raise SourceError("binary content (NUL bytes): not a text structure or sequence file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
        printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text[:65536])
        if printable < 0.95 * min(len(text), 65536):
            raise SourceError("binary content: the bytes are not text") from None
    first = _first_line(text)
    if first.startswith(">"):
        return "fasta", text
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.lower().startswith("data_"):
            return "mmcif", text
        break
    lines = [ln for ln in text.splitlines()[:200] if ln.strip()]
    if lines and any(ln[:6].strip().upper() in PDB_RECORDS for ln in lines[:5]):
        return "pdb", text
    if any(ln.startswith(("ATOM  ", "HETATM")) for ln in lines):
        return "pdb", text
    raise SourceError(f"unrecognised content (not PDB, mmCIF, FASTA or HDF5); it starts with {first[:60]!r}")
