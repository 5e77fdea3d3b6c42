"""Input discovery: files and folders -> an ordered list of input files and work units.

Folders are searched recursively for the supported extensions (``.pdb .ent .cif .mmcif .fasta
.fa .faa .fas .h5 .hdf5``, each optionally ``.gz``); other files in folders are ignored and
counted.  A file named explicitly is always an input, whatever its extension (its content
decides).  Order is deterministic (sorted paths), so a re-run sees the same inputs in the same
order.  Each input gets a location-independent ``source`` name: its path relative to the common
parent of the input roots (``biotite_testdata/1aki.pdb.gz``), so stores built from copies of the
same data in different places agree.

A ``pdb.h5`` file is split into work units of ``h5_groups_per_unit`` groups so one large file is
parsed in parallel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from sepit.structure.formats import FILE_FORMATS, HDF5_MAGIC, format_from_name


@dataclass(frozen=True)
class InputFile:
    path: str
    """Absolute path."""
    source: str
    """Stable name recorded in the store (relative to the common parent of the input roots)."""
    fmt: Optional[str]
    """Format by extension (None when the extension is not a supported one)."""


@dataclass
class Discovery:
    files: list[InputFile] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Input paths that do not exist (each becomes a reject of its own)."""
    ignored: list[str] = field(default_factory=list)
    """Files inside input folders with unsupported extensions (not inputs; listed for transparency)."""


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def discover_inputs(paths: Sequence[str | Path], formats: Iterable[str] = FILE_FORMATS) -> Discovery:
    """Expand ``paths`` (files/folders) into input files, sorted, de-duplicated."""
    wanted = set(formats)
    unknown = wanted - set(FILE_FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}; choose from {list(FILE_FORMATS)}")
    roots = [Path(p).expanduser().absolute() for p in paths]
    out = Discovery()
    existing = [r for r in roots if r.exists()]
    out.missing = [str(r) for r in roots if not r.exists()]
    if not existing:
        return out
    base = Path(os.path.commonpath([str(r.parent) for r in existing]))
    seen: set[Path] = set()
    found: list[tuple[Path, Optional[str]]] = []
    for root in existing:
        if root.is_file():
            candidates = [(root, format_from_name(root.name))]
        else:
            candidates = []
            for p in sorted(root.rglob("*")):
                if not p.is_file() or _is_hidden(p, root):
                    continue
                fmt = format_from_name(p.name)
                if fmt in wanted:
                    candidates.append((p, fmt))
                else:
                    out.ignored.append(str(p))
        for p, fmt in candidates:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                found.append((p, fmt))
    for p, fmt in sorted(found, key=lambda x: str(x[0])):
        out.files.append(InputFile(str(p), p.relative_to(base).as_posix(), fmt))
    out.ignored.sort()
    return out


def is_hdf5(path: str | Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(HDF5_MAGIC)) == HDF5_MAGIC
    except OSError:
        return False


def default_inputs() -> list[str]:
    """The bundled real structure folders (PDB/mmCIF files under ``sepit/resources/data``)."""
    from sepit.resources import DATA_DIR

    folders = sorted({
        p.parent for p in DATA_DIR.rglob("*")
        if p.is_file() and format_from_name(p.name) in ("pdb", "mmcif")
    })
    # keep only top-most folders (a folder inside another listed folder adds nothing)
    top = [f for f in folders if not any(o != f and o in f.parents for o in folders)]
    return [str(f) for f in top]
