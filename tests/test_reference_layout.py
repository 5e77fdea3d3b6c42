"""Export to the reference's pdb.h5 + JSONL layout and import back, on a real build."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from dataset_support import all_rows, small_build, write_store

from sepit.data.build import BuildConfig, build_dataset
from sepit.data.reference_layout import ReferenceLayoutError, export_reference, import_reference
from sepit.structure.reference_h5 import records_from_h5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    dataset = small_build(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("reference")
    counts = export_reference(dataset, out)
    return dataset, out, counts


def test_layout_files_and_shapes(exported):
    dataset, out, counts = exported
    rows = all_rows(dataset)
    for name in ("pdb.h5", "stage0/train.jsonl", "stage1/train.jsonl", "stage2/train.jsonl", "stage2/qa_test.jsonl"):
        assert (out / name).is_file()
    assert counts["stage2/qa_test.jsonl"] == sum(r["stage"] == 2 and r["split"] == "test" for r in rows) > 0
    first0 = json.loads((out / "stage0" / "train.jsonl").read_text().splitlines()[0])
    assert set(first0) >= {"id", "caption"} and "conversation" not in first0
    first2 = json.loads((out / "stage2" / "train.jsonl").read_text().splitlines()[0])
    assert [t["role"] for t in first2["conversation"]] == ["user", "assistant"]
    assert "<protein>" in first2["conversation"][0]["content"]
    with h5py.File(out / "pdb.h5", "r") as h5:
        assert len(h5) == len({r["protein_id"] for r in rows})
        g = h5["O84033"]
        assert g["sequence"].shape == (1,) and g["node_position"].shape == (len(g["sequence"][0]), 3)


def test_round_trip_keeps_sequences_coordinates_and_texts(exported):
    dataset, out, _counts = exported
    rows = all_rows(dataset)
    back = import_reference(out)
    assert len(back.examples) == len(rows)
    by_id = {e["example_id"]: e for e in back.examples}
    n_structured = 0
    for r in rows:
        e = by_id[r["id"]]
        assert (e["stage"], e["split"], e["protein_id"], e["question"], e["answer"], e["task"], e["category"]) == \
            (r["stage"], r["split"], r["protein_id"], r["question"], r["answer"], r["task"], r["category"])
        assert e["choices"] == r["choices"] and e["answer_letter"] == r["answer_letter"]
        seq, coords, mask = back.proteins[r["protein_id"]]
        assert seq == r["sequence"]
        if r["has_structure"]:
            n_structured += 1
            want = np.asarray(r["coords"], np.float32).reshape(-1, 3)
            assert mask.tolist() == r["coord_mask"]
            np.testing.assert_array_equal(coords[mask].astype(np.float32), want[mask])
        else:
            assert coords is None
    assert n_structured > 0


def test_masked_residues_are_zero_rows_that_the_structure_reader_masks(exported, tmp_path):
    """A structure that covers part of its protein: missing residues become all-zero rows."""
    dataset, _out, _ = exported
    rows = [r for r in all_rows(dataset) if r["has_structure"]]
    row = dict(rows[0])
    mask = list(row["coord_mask"])
    mask[:10] = [False] * 10  # as if the first 10 residues were unresolved
    coords = np.asarray(row["coords"], np.float32).reshape(-1, 3)
    coords[:10] = 0.0
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sepit.data.instruction_schema import INSTRUCTION_SCHEMA

    fake = tmp_path / "ds"
    for stage in (0, 1, 2):
        (fake / f"stage{stage}").mkdir(parents=True)
        for split in ("train", "val", "test"):
            keep = [{**row, "stage": stage, "split": split, "coord_mask": mask, "coords": coords.ravel().tolist(),
                     "id": f"x{stage}{split}"}] if split == "train" else []
            pq.write_table(pa.Table.from_pylist(keep, schema=INSTRUCTION_SCHEMA), fake / f"stage{stage}" / f"{split}.parquet")
    export_reference(fake, tmp_path / "ref")
    with h5py.File(tmp_path / "ref" / "pdb.h5", "r") as h5:
        pos = h5[row["protein_id"]]["node_position"][()]
    assert (pos[:10] == 0).all() and (pos[10:] != 0).any(axis=1).all()
    (rec,) = records_from_h5(tmp_path / "ref" / "pdb.h5", "pdb.h5").records
    assert rec.coord_mask.tolist() == mask


def test_reference_layout_builds_again(exported, tmp_path):
    """The exported layout is itself builder input: pdb.h5 as the store, the JSONL as annotations."""
    dataset, out, counts = exported
    store = write_store(records_from_h5(out / "pdb.h5", str(out / "pdb.h5")).records, tmp_path / "store")
    files = [str(out / "stage2" / "train.jsonl")]
    card = build_dataset(BuildConfig(proteins=str(store), annotations=files, out=str(tmp_path / "again"),
                                     executor="local", id_maps=[]))
    assert card["inputs"]["records"] == card["inputs"]["used"] == counts["stage2/train.jsonl"]
    rebuilt = {(r["protein_id"], r["question"], r["answer"]): r for r in all_rows(tmp_path / "again")}
    original = [r for r in all_rows(dataset) if r["stage"] == 2 and r["split"] == "train"]
    assert len(rebuilt) == len(original)
    for r in original:
        again = rebuilt[(r["protein_id"], r["question"], r["answer"])]
        assert again["sequence"] == r["sequence"] and again["coord_mask"] == r["coord_mask"]
        assert again["coords"] == r["coords"] and again["choices"] == r["choices"]


def test_import_errors(tmp_path):
    with pytest.raises(ReferenceLayoutError, match="pdb.h5 is missing"):
        import_reference(tmp_path)
