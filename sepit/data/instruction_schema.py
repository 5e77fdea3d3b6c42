"""Parquet schemas of the instruction dataset (``DATA/stage{0,1,2}/{train,val,test}.parquet``).

Contract columns (shared with training, evaluation and the reference exporter): ``id,
protein_id, accession, task, category, question, answer, choices, answer_letter, source,
has_structure, sequence, coords, coord_mask, split``.  Added columns: ``stage``, ``store_id``
(the protein-store record that lent coordinates), ``source_file`` and ``source_record`` (where
the example came from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

STAGES = (0, 1, 2)
INSTRUCTION_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("protein_id", pa.string()),
    ("accession", pa.string()),
    ("task", pa.string()),            # caption | open | yes_no | multiple_choice
    ("category", pa.string()),
    ("question", pa.string()),        # holds "<protein>" exactly once
    ("answer", pa.string()),          # multiple choice: "B) option text"
    ("choices", pa.list_(pa.string())),
    ("answer_letter", pa.string()),
    ("source", pa.string()),
    ("has_structure", pa.bool_()),
    ("sequence", pa.string()),
    ("coords", pa.list_(pa.float32())),   # flat [3n] Cα x,y,z in Å on ``sequence``; null = sequence-only
    ("coord_mask", pa.list_(pa.bool_())),  # [n]; False rows of coords are 0 and carry no position
    ("split", pa.string()),
    ("stage", pa.int8()),
    ("store_id", pa.string()),
    ("source_file", pa.string()),
    ("source_record", pa.string()),
])
SKIPPED_SCHEMA = pa.schema([
    ("source_file", pa.string()),
    ("record", pa.string()),
    ("accession", pa.string()),
    ("stage", pa.string()),           # read | join | generate | dedupe | store
    ("reason", pa.string()),
])


def stage_split_path(root: str | Path, stage: int, split: str) -> Path:
    return Path(root) / f"stage{stage}" / f"{split}.parquet"


def row_protein(row: dict[str, Any], drop_structure: bool = False) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """(sequence, coords [n,3] float32 or None, coord_mask [n] bool or None) of one row: the
    protein argument of the encoder's collate and of ``generate``; ``drop_structure`` gives the
    sequence alone."""
    seq = row["sequence"]
    if drop_structure or row.get("coords") is None:
        return seq, None, None
    coords = np.asarray(row["coords"], np.float32).reshape(len(seq), 3)
    return seq, coords, np.asarray(row["coord_mask"], bool)
