"""Bundled real data (see resources/data/PROVENANCE.md)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def data_path(*parts: str) -> Path:
    """Path of a bundled data file, e.g. ``data_path("derived", "qa.jsonl.gz")``."""
    p = DATA_DIR.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"bundled data file {p} is missing from this install")
    return p
