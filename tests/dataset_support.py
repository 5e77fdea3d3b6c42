"""Support for the dataset tests: a small real protein store and one small real build per session.

The store holds real AlphaFold DB models and one experimental PDB entry from the bundled data,
parsed in-process by :func:`sepit.structure.parse.load_records` and written with the store's own
schema (no Ray, a few seconds).  The build reads real bundled annotations: every UniProt entry,
the STRING table (with the bundled id map), the QA JSON lines, and the first 300 records of the
DeepLoc test FASTA (a real file cut short so the tests stay fast).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq

from sepit.data.build import BuildConfig, build_dataset
from sepit.data.build_inputs import default_annotation_files
from sepit.resources import DATA_DIR
from sepit.structure.parse import load_records
from sepit.structure.store import MANIFEST, PROTEINS_DIR, records_table, write_table

#: AFDB models whose accessions have STRING function text, plus one with an experimental entry.
STORE_FILES = [
    "chlamatlas_afdb/afdb_models/AF-O84033-F1-model_v4.cif.gz",
    "chlamatlas_afdb/afdb_models/AF-O84042-F1-model_v4.cif.gz",
    "chlamatlas_afdb/afdb_models/AF-O84102-F1-model_v4.cif.gz",
    "chlamatlas_afdb/afdb_models/AF-O84130-F1-model_v4.cif.gz",
    "chlamatlas_afdb/afdb_models/AF-O84544-F1-model_v4.cif.gz",
    "chlamatlas_afdb/afdb_models/AF-O84835-F1-model_v4.cif.gz",
    "chlamatlas_afdb/afdb_models/AF-O84043-F1-model_v4.cif.gz",  # "Uncharacterized protein": stays unused
    "chlamatlas_afdb/pdb_experimental/1syy.pdb.gz",  # O84835 again, experimental fragment
]
N_DEEPLOC = 300

_built: dict[str, Path] = {}


def write_small_store(root: Path) -> Path:
    """A protein store folder of the STORE_FILES records."""
    records = []
    for rel in STORE_FILES:
        records += load_records(DATA_DIR / rel)
    return write_store(records, root)


def write_store(records, root: Path) -> Path:
    """A protein store folder (same layout and schema as ``sepit preprocess`` writes)."""
    (root / PROTEINS_DIR).mkdir(parents=True)
    shard = f"{PROTEINS_DIR}/part-00000.parquet"
    sha = write_table(records_table([r.to_row() for r in records]), root / shard)
    manifest = {"n_records": len(records), "shards": [{"file": shard, "sha256": sha, "n_records": len(records)}],
                "n_rejected": 0}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def deeploc_head(path: Path, n_records: int = N_DEEPLOC) -> Path:
    """The first ``n_records`` records of the real DeepLoc test FASTA, gzipped at ``path``."""
    out, seen = [], 0
    with gzip.open(DATA_DIR / "deeploc_lightattention" / "deeploc_test_set.fasta.gz", "rt") as fh:
        for line in fh:
            if line.startswith(">"):
                seen += 1
                if seen > n_records:
                    break
            out.append(line)
    with gzip.open(path, "wt") as fh:
        fh.writelines(out)
    return path


def small_annotation_files(root: Path) -> list[str]:
    files = [f for f in default_annotation_files() if "deeploc" not in f]
    return files + [str(deeploc_head(root / "deeploc_head.fasta.gz"))]


def small_build(base: Path) -> Path:
    """Build once per session under ``base``; later calls return the same folder."""
    if "small" not in _built:
        root = base / "dataset_support"
        root.mkdir(parents=True, exist_ok=True)
        store = write_small_store(root / "store")
        out = root / "dataset"
        build_dataset(BuildConfig(proteins=str(store), annotations=small_annotation_files(root), out=str(out),
                                  executor="local", seed=7))
        _built["small"] = out
    return _built["small"]


def all_rows(dataset: Path) -> list[dict]:
    rows = []
    for stage in (0, 1, 2):
        for split in ("train", "val", "test"):
            rows += pq.read_table(dataset / f"stage{stage}" / f"{split}.parquet").to_pylist()
    return rows
