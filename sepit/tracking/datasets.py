"""The dataset splits a run read, as MLflow dataset inputs (``mlflow.log_input``).

Each split file becomes one input of the active run: its source (the file's path or object-store
URI), a digest (the split's sha256, already computed for ``lineage.json``: nothing is read again),
the split as context (``train`` / ``val`` / ``test``) and its row count as a tag.  The data
itself is not copied; the MLflow UI lists which run trained on which files, and runs that read
the same bytes share one dataset entry.
"""

from __future__ import annotations

import warnings
from typing import Mapping

#: Digest length MLflow shows (its own digests are 8 hex digits); the full sha256 stays in lineage.json.
DIGEST_CHARS = 16


def log_split_inputs(dataset_uri: str, files: Mapping[str, str], rows: Mapping[str, int] | None = None) -> int:
    """Log ``files`` (``{"stage2/train.parquet": sha256}`` under ``dataset_uri``) as inputs of the
    active run; returns how many were logged."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    datasets, contexts = [], []
    for rel, sha in sorted(files.items()):
        split = rel.rsplit("/", 1)[-1].removesuffix(".parquet")
        with warnings.catch_warnings():  # a local path matches two registered source types; MLflow picks one
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            source = resolve_dataset_source(f"{dataset_uri.rstrip('/')}/{rel}")
        datasets.append(MetaDataset(source, name=rel.removesuffix(".parquet"), digest=sha[:DIGEST_CHARS]))
        contexts.append(split)
    for ds, split in zip(datasets, contexts):
        tags = {"rows": str(rows[split])} if rows and split in rows else None
        mlflow.log_input(ds, context=split, tags=tags)
    return len(datasets)
