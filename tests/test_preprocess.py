"""The preprocess job on Ray Data: bundled real data, a folder of good and broken files,
reconciled counts, idempotent re-runs, worker-count independence, the store reader and the CLI."""

from __future__ import annotations

import gzip
import json
import shutil

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from sepit.cli import main as sepit_main
from sepit.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from sepit.resources import DATA_DIR
from sepit.structure import parse_file
from sepit.structure.formats import format_from_name
from sepit.structure.inputs import default_inputs
from sepit.structure.store import ProteinStore, StoreError

BUNDLED_STRUCTURES = sorted(p for p in DATA_DIR.rglob("*") if format_from_name(p.name) in ("pdb", "mmcif"))


def _check_reconciles(manifest: dict, store_path) -> None:
    assert manifest["n_input_files"] == manifest["n_files_with_records"] + manifest["n_files_without_records"]
    assert manifest["n_records"] == sum(s["n_records"] for s in manifest["shards"])
    assert pq.read_table(store_path / "rejects.parquet").num_rows == manifest["n_rejected"]
    assert sum(manifest["rejects_by_stage"].values()) == manifest["n_rejected"]
    store = ProteinStore(store_path)
    store.verify()
    assert sum(1 for _ in store.records()) == len(store) == manifest["n_records"]
    assert json.loads((store_path / "manifest.json").read_text()) == manifest


@pytest.fixture(scope="module")
def bundled(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "store"
    return run_preprocess(PreprocessConfig(out=str(out), num_workers=2, shard_size=50)), out


def test_bundled_structures_become_a_reconciled_store(bundled):
    manifest, out = bundled
    _check_reconciles(manifest, out)
    direct = [parse_file(p) for p in BUNDLED_STRUCTURES]
    assert manifest["n_input_files"] == len(BUNDLED_STRUCTURES) == manifest["n_files_with_records"]
    assert manifest["n_records"] == sum(len(r.records) for r in direct)
    assert manifest["n_rejected"] == sum(len(r.rejects) for r in direct) == 5  # the DNA chains of 1LCD, 5UGO
    assert [s["n_records"] for s in manifest["shards"]] == [50, 50, manifest["n_records"] - 100]
    store = ProteinStore(out)
    by_id = {r.id: r for r in store.records()}
    for result in direct:
        for rec in result.records:
            got = by_id[rec.id]
            assert got.sequence == rec.sequence and got.accession == rec.accession and got.checksum == rec.checksum
            np.testing.assert_array_equal(got.coord_mask, rec.coord_mask)
            np.testing.assert_allclose(got.coords, rec.coords)
    assert by_id["1aki:A"].source == "biotite_testdata/1aki.pdb.gz"  # location-independent source names
    assert [r.id for r in store.by_accession()["O84835"]] == ["AF-O84835-F1:A", "1syy:A"]
    assert store.get("AF-O84033-F1:A").plddt is not None
    rejects = store.rejects().to_pylist()
    assert {(r["source"], r["chain"]) for r in rejects} == {
        ("biopython_testdata/pdb/1LCD.pdb.gz", "B"), ("biopython_testdata/pdb/1LCD.pdb.gz", "C"),
        ("biotite_testdata/5ugo.pdb.gz", "T"), ("biotite_testdata/5ugo.pdb.gz", "P"), ("biotite_testdata/5ugo.pdb.gz", "D"),
    }
    summary = store.summary()
    assert summary["by_format"] == {"afdb": 82, "mmcif": 5, "pdb": manifest["n_records"] - 87}
    assert summary["by_folder"]["chlamatlas_afdb/afdb_models"] == {"records": 81}
    assert summary["with_structure"] == manifest["n_records"] and summary["sequence_only"] == 0


def test_default_inputs_cover_every_bundled_structure():
    folders = default_inputs()
    covered = {p for f in folders for p in BUNDLED_STRUCTURES if str(p).startswith(f + "/")}
    assert covered == set(BUNDLED_STRUCTURES)


def _write_h5(path, records):
    with h5py.File(path, "w") as f:
        for rec in records:
            g = f.create_group(rec.accession)
            g.create_dataset("sequence", data=np.array([rec.sequence.encode()]))
            pos = rec.coords.copy()
            pos[:3] = 0.0  # the reference's "missing" sentinel rows
            g.create_dataset("node_position", data=pos)
        bad = f.create_group("P99999")
        bad.create_dataset("sequence", data=np.array([b"MKV"]))
        bad.create_dataset("node_position", data=np.ones((5, 3)))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Real good files next to every kind of broken file."""
    root = tmp_path_factory.mktemp("mixed") / "inputs"
    good = root / "good"
    good.mkdir(parents=True)
    for rel in ("biotite_testdata/1aki.pdb.gz", "biotite_testdata/5ugo.pdb.gz", "biotite_testdata/7gsa.cif.gz",
                "chlamatlas_afdb/afdb_models/AF-O84033-F1-model_v4.cif.gz", "biopython_testdata/swissprot/multi_ex.fasta.gz"):
        shutil.copy(DATA_DIR / rel, good)
    (good / "plain_1aki_copy.pdb").write_text(gzip.open(DATA_DIR / "biotite_testdata/1aki.pdb.gz", "rt").read())
    afdb = [parse_file(DATA_DIR / f"chlamatlas_afdb/afdb_models/AF-{a}-F1-model_v4.cif.gz").records[0] for a in ("O84038", "O84042", "O84043", "O84071")]
    _write_h5(good / "pdb.h5", afdb)
    bad = root / "broken"
    bad.mkdir()
    text = gzip.open(DATA_DIR / "biotite_testdata/1aki.pdb.gz", "rt").read()
    (bad / "truncated.pdb").write_text(text[: len(text) // 2])
    (bad / "empty.cif").write_bytes(b"")
    (bad / "binary.pdb").write_bytes(bytes(range(256)) * 16)
    (bad / "wrong_extension.cif.gz").write_bytes(gzip.compress(b"<html><body>not a structure</body></html>\n"))
    (bad / "malformed.cif").write_text("data_bad\nloop_\n_atom_site.id\n_atom_site.Cartn_x\n1 2 3\n")
    (bad / "dna_only.pdb").write_text("\n".join(
        ln for ln in gzip.open(DATA_DIR / "biotite_testdata/5ugo.pdb.gz", "rt").read().splitlines()
        if not (ln.startswith(("ATOM", "HETATM", "ANISOU", "TER")) and ln[21] == "A")))
    (bad / "gapped.fasta").write_text(">a1\nMKV--L\n>a2\nMKVL\n")
    (bad / "README.txt").write_text("not an input: ignored by extension")
    dup = root / "dup"
    dup.mkdir()
    shutil.copy(DATA_DIR / "biotite_testdata/1aki.pdb.gz", dup)  # same id 1aki:A as good/1aki.pdb.gz
    return root


def test_mixed_good_and_broken_folder_reconciles(ray_local, mixed_folder, tmp_path):
    out = tmp_path / "store"
    manifest = run_preprocess(PreprocessConfig(inputs=[str(mixed_folder)], out=str(out), num_workers=2))
    _check_reconciles(manifest, out)
    assert manifest["n_input_files"] == 15 and manifest["n_ignored_files"] == 1
    rejects = {(r["source"], r["chain"]): (r["stage"], r["reason"]) for r in ProteinStore(out).rejects().to_pylist()}
    expect = {
        ("inputs/broken/truncated.pdb", None): "truncated",
        ("inputs/broken/empty.cif", None): "empty file",
        ("inputs/broken/binary.pdb", None): "binary content",
        ("inputs/broken/wrong_extension.cif.gz", None): "unrecognised content",
        ("inputs/broken/malformed.cif", None): "malformed mmCIF",
        ("inputs/broken/dna_only.pdb", "T"): "nucleic-acid chain (DNA)",
        ("inputs/broken/gapped.fasta", "a1"): "sequence contains alignment gaps",
        ("inputs/good/pdb.h5", "P99999"): "node_position has 5 rows but the sequence has 3 residues",
        ("inputs/good/1aki.pdb.gz", "A"): "duplicate record id '1aki:A': already produced by inputs/dup/1aki.pdb.gz",
    }
    for key, reason in expect.items():
        assert rejects[key][1].startswith(reason), (key, rejects[key])
    files_without = {"truncated.pdb", "empty.cif", "binary.pdb", "wrong_extension.cif.gz", "malformed.cif", "dna_only.pdb"}
    assert manifest["n_files_without_records"] == len(files_without) + 1  # + good/1aki.pdb.gz (its only chain is a duplicate)
    store = ProteinStore(out)
    h5 = [r for r in store.records() if r.source_format == "h5"]
    assert [r.id for r in h5] == ["O84038", "O84042", "O84043", "O84071"]
    assert all(not r.coord_mask[:3].any() and r.coord_mask[3:].all() for r in h5)
    assert {r.id for r in store.records() if r.source_format == "fasta"} >= {"a2", "P00750"}


def test_rerun_is_idempotent_and_independent_of_worker_count(ray_local, mixed_folder, tmp_path):
    out = tmp_path / "store"

    def build(workers: int, **kw) -> dict:
        m = run_preprocess(PreprocessConfig(inputs=[str(mixed_folder)], out=str(out), num_workers=workers, shard_size=4, **kw))
        return {"shards": m["shards"], "rejects": m["rejects_sha256"], "n": (m["n_records"], m["n_rejected"])}

    first = build(2)
    assert len(first["shards"]) > 2
    assert build(2) == first  # re-run replaces the store with identical bytes
    assert build(1) == first  # one worker or two: same shards, same order
    h5_split = build(2, h5_groups_per_unit=2)  # pdb.h5 cut into 3 work units
    assert h5_split == first
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".store.")]  # no temp folders left


def test_refuses_to_replace_a_folder_that_is_not_a_store(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("months of work")
    with pytest.raises(PreprocessError, match="refusing to replace"):
        run_preprocess(PreprocessConfig(inputs=[str(DATA_DIR / "esm_examples")], out=str(precious)))
    assert (precious / "thesis.tex").read_text() == "months of work"
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ProteinStore(precious)


def test_tampered_shard_fails_verification(bundled, tmp_path):
    _, out = bundled
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / "proteins/part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    with pytest.raises(StoreError, match="part-00001.parquet"):
        ProteinStore(copy).verify()


def test_cli_preprocess_with_summary(ray_local, tmp_path, capsys):
    out = tmp_path / "cli_store"
    missing = tmp_path / "no_such_dir"
    rc = sepit_main(["preprocess", str(DATA_DIR / "esm_examples"), str(DATA_DIR / "graphein_testdata"), str(missing),
                     "--out", str(out), "--workers", "1", "--summary"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "protein store: 3 records from 3 of 4 input files; 1 rejected" in printed
    assert "graphein_testdata" in printed and "input path does not exist" in printed
    assert ProteinStore(out).manifest["config"]["num_workers"] == 1


def test_cli_rejects_invalid_config_naming_the_field(tmp_path, capsys):
    rc = sepit_main(["preprocess", str(DATA_DIR / "esm_examples"), "--out", str(tmp_path / "s"), "--set", "sequence_source=atoms"])
    err = capsys.readouterr().err
    assert rc == 2 and "sequence_source='atoms' is not allowed; choose one of ['seqres', 'model']" in err
    rc = sepit_main(["preprocess", str(tmp_path / "nothing_here"), "--out", str(tmp_path / "s2")])
    assert rc == 1 and "no protein record was produced" in capsys.readouterr().err
