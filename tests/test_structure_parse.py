"""Parsing rules of sepit.structure on the bundled real files (plus edits of them for the rules
real files do not exercise: a missing Cα, unknown residues, NaN and absurd coordinates)."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest

from sepit.resources import DATA_DIR
from sepit.structure import ParseOptions, StructureError, load_records, parse_bytes, parse_file, parse_structure_text
from sepit.structure.formats import format_from_name

STRUCTURE_FILES = sorted(p for p in DATA_DIR.rglob("*") if format_from_name(p.name) in ("pdb", "mmcif"))
#: Every bundled structure file whose parse yields rejects, with the (only) correct reason.
EXPECTED_REJECTS = {
    "biopython_testdata/pdb/1LCD.pdb.gz": {"B": "nucleic-acid chain (DNA)", "C": "nucleic-acid chain (DNA)"},
    "biotite_testdata/5ugo.pdb.gz": {"T": "nucleic-acid chain (DNA)", "P": "nucleic-acid chain (DNA)", "D": "nucleic-acid chain (DNA)"},
}


def text_of(rel: str) -> str:
    return gzip.open(DATA_DIR / rel, "rt").read()


def record(rel: str, chain: str):
    return load_records(DATA_DIR / rel, chain=chain)[0]


def test_every_bundled_structure_parses_or_is_rejected_for_its_stated_reason():
    assert len(STRUCTURE_FILES) > 100
    for path in STRUCTURE_FILES:
        rel = path.relative_to(DATA_DIR).as_posix()
        result = parse_file(path)
        assert result.records, f"{rel}: no record ({[str(r) for r in result.rejects]})"
        got = {r.chain: r.reason for r in result.rejects}
        want = EXPECTED_REJECTS.get(rel, {})
        assert set(got) == set(want), f"{rel}: rejects {got}"
        for chain, reason in got.items():
            assert reason.startswith(want[chain]), f"{rel} chain {chain}: {reason}"
        for rec in result.records:
            assert rec.has_structure and rec.checksum and rec.source == str(path)
            assert len(rec.meta["residue_ids"]) == rec.length


def test_first_model_of_nmr_file():
    rec = record("biopython_testdata/pdb/1LCD.pdb.gz", "A")
    assert rec.meta["n_models"] == 3
    # first ATOM CA of MODEL 1 (not of models 2/3)
    text = text_of("biopython_testdata/pdb/1LCD.pdb.gz")
    first_ca = next(ln for ln in text.splitlines() if ln.startswith("ATOM") and ln[12:16] == " CA ")
    xyz = [float(first_ca[30 + 8 * i: 38 + 8 * i]) for i in range(3)]
    np.testing.assert_allclose(rec.coords[0], xyz, atol=1e-3)


def test_altloc_with_highest_occupancy_wins():
    rec = record("biotite_testdata/3o5r.pdb.gz", "A")  # MET 48 has CA altloc A (0.25) and B (0.75)
    text = text_of("biotite_testdata/3o5r.pdb.gz")
    line_b = next(ln for ln in text.splitlines() if ln.startswith("ATOM") and ln[12:16] == " CA " and ln[16] == "B" and ln[22:26].strip() == "48")
    i = rec.meta["residue_ids"].index("48")
    np.testing.assert_allclose(rec.coords[i], [float(line_b[30 + 8 * k: 38 + 8 * k]) for k in range(3)], atol=1e-3)


def test_modified_residues_map_to_parent_and_unknown_to_x():
    rec = record("alphafold_testdata/2rbg.pdb.gz", "A")  # MODRES MSE A 102 -> MET
    assert rec.sequence[rec.meta["residue_ids"].index("102")] == "M"
    text = text_of("esm_examples/2N2U.pdb.gz")
    edited = "\n".join(
        (ln[:17] + "ZZZ" + ln[20:]) if ln.startswith("ATOM") and ln[22:26].strip() == "5" else
        (ln[:17] + "UNK" + ln[20:]) if ln.startswith("ATOM") and ln[22:26].strip() == "6" else ln
        for ln in text.splitlines()
    )
    orig = parse_structure_text(text, "pdb", "2N2U.pdb").records[0]
    rec = parse_structure_text(edited, "pdb", "2N2U.pdb").records[0]
    assert rec.length == orig.length
    assert rec.sequence[4:6] == "XX" and orig.sequence[4:6] != "XX"
    assert rec.sequence[:4] + rec.sequence[6:] == orig.sequence[:4] + orig.sequence[6:]


def test_residue_without_ca_is_kept_with_masked_coordinate():
    text = text_of("biotite_testdata/1aki.pdb.gz")
    edited = "\n".join(ln for ln in text.splitlines() if not (ln.startswith("ATOM") and ln[12:16] == " CA " and ln[22:26].strip() == "10"))
    orig = parse_structure_text(text, "pdb", "1aki.pdb").records[0]
    rec = parse_structure_text(edited, "pdb", "1aki.pdb").records[0]
    assert rec.sequence == orig.sequence
    i = rec.meta["residue_ids"].index("10")
    assert not rec.coord_mask[i] and rec.coord_mask.sum() == orig.coord_mask.sum() - 1
    np.testing.assert_array_equal(np.delete(rec.coords, i, 0), np.delete(orig.coords, i, 0))


def test_unmodelled_seqres_residues_are_masked_and_model_mode_drops_them():
    rec = record("alphafold_testdata/2rbg.pdb.gz", "A")  # SEQRES 126, 124 modelled
    assert (rec.length, int(rec.coord_mask.sum()), rec.meta["sequence_source"]) == (126, 124, "seqres")
    assert all((rid is None) == (not m) for rid, m in zip(rec.meta["residue_ids"], rec.coord_mask))
    model = load_records(DATA_DIR / "alphafold_testdata/2rbg.pdb.gz", chain="A", options=ParseOptions(sequence_source="model"))[0]
    assert model.length == 124 and model.coord_mask.all()
    assert model.sequence == "".join(a for a, m in zip(rec.sequence, rec.coord_mask) if m)


def test_waters_and_ligands_are_ignored():
    result = parse_file(DATA_DIR / "biotite_testdata/3o5r.pdb.gz")  # FK506 ligand + waters
    assert [r.chain for r in result.records] == ["A"] and not result.rejects
    assert set(result.records[0].sequence) <= set("ACDEFGHIKLMNPQRSTVWY")


def test_nucleic_acid_chains_are_skipped_with_reason():
    result = parse_file(DATA_DIR / "biotite_testdata/5ugo.pdb.gz")
    assert [r.chain for r in result.records] == ["A"]
    assert {r.chain: r.reason for r in result.rejects} == {c: "nucleic-acid chain (DNA) skipped: not a protein" for c in "TPD"}


def test_named_chain_and_first_chain_policy():
    path = DATA_DIR / "biopython_testdata/pdb/7DDO.pdb.gz"
    assert [r.chain for r in parse_file(path).records] == ["A", "C"]
    assert [r.chain for r in parse_file(path, chain="C").records] == ["C"]
    assert [r.chain for r in parse_file(path, options=ParseOptions(chain_policy="first")).records] == ["A"]
    missing = parse_file(path, chain="Z")
    assert not missing.records and missing.rejects[0].reason == "chain Z not found; protein chains: A, C"
    with pytest.raises(StructureError, match="chain Z not found"):
        load_records(path, chain="Z")
    dna = parse_file(DATA_DIR / "biotite_testdata/5ugo.pdb.gz", chain="T")
    assert not dna.records and "nucleic-acid" in dna.rejects[0].reason


@pytest.mark.parametrize("rel, chain, accession", [
    ("biopython_testdata/pdb/7DDO.pdb.gz", "A", "Q9BYF1"),        # DBREF
    ("biopython_testdata/pdb/7DDO.pdb.gz", "C", "A0A6M3G9R1"),    # DBREF1/DBREF2
    ("biotite_testdata/7gsa.cif.gz", "A", "P18031"),              # _struct_ref + _struct_ref_seq
    ("biopython_testdata/pdb/1A7G.cif.gz", "E", "P17383"),        # auth chain E
    ("chlamatlas_afdb/afdb_models/AF-O84033-F1-model_v4.cif.gz", "A", "O84033"),
    ("graphein_testdata/P04629.pdb.gz", "A", "P04629"),           # AFDB model in PDB format
    ("esm_examples/2N2U.pdb.gz", "A", None),                      # headerless: no accession stated
])
def test_accessions_as_the_file_states_them(rel, chain, accession):
    assert record(rel, chain).accession == accession


def test_alphafold_models_carry_plddt_from_b_factor():
    rel = "chlamatlas_afdb/afdb_models/AF-O84033-F1-model_v4.cif.gz"
    rec = record(rel, "A")
    assert rec.source_format == "afdb" and rec.id == "AF-O84033-F1:A"
    b = {}
    for ln in text_of(rel).splitlines():  # ModelCIF atom_site: B_iso is the per-residue pLDDT
        if ln.startswith("ATOM") and " CA " in ln:
            f = ln.split()
            b[f[8]] = float(f[14])
    assert len(b) == rec.length
    np.testing.assert_allclose(rec.plddt, [b[r] for r in rec.meta["residue_ids"]], atol=1e-2)
    pdb_model = record("graphein_testdata/P04629.pdb.gz", "A")
    assert pdb_model.source_format == "afdb" and 0 < np.nanmean(pdb_model.plddt) <= 100
    assert record("biotite_testdata/1aki.pdb.gz", "A").plddt is None  # experimental: no pLDDT


def _edit_first_ca(text: str, xyz: str) -> str:
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("ATOM") and ln[12:16] == " CA ")
    lines[i] = lines[i][:30] + xyz + lines[i][54:]
    return "\n".join(lines)


def test_nan_and_absurd_coordinates_reject_the_chain():
    text = text_of("biotite_testdata/1aki.pdb.gz")
    nan = parse_structure_text(_edit_first_ca(text, f"{'nan':>8}{'1.0':>8}{'1.0':>8}"), "pdb", "1aki.pdb")
    assert not nan.records and "NaN" in nan.rejects[0].reason and nan.rejects[0].chain == "A"
    far = parse_structure_text(_edit_first_ca(text, f"{'-9999.9':>8}{'1.0':>8}{'99999.0':>8}"), "pdb", "1aki.pdb")
    assert not far.records and "absurd coordinate" in far.rejects[0].reason
    cif = text_of("biopython_testdata/pdb/1A7G.cif.gz")
    m = re.search(r"^ATOM\s+2\s+C\s+CA\s+.*$", cif, re.M)
    fields = m.group(0).split()
    fields[10] = "123456.789"  # Cartn_x
    bad = parse_structure_text(cif.replace(m.group(0), " ".join(fields)), "mmcif", "1A7G.cif")
    assert "absurd coordinate" in bad.rejects[0].reason


def test_content_decides_the_format_unless_strict(tmp_path):
    pdb_as_cif = tmp_path / "1aki.cif"
    pdb_as_cif.write_text(text_of("biotite_testdata/1aki.pdb.gz"))
    result = parse_file(pdb_as_cif)
    assert result.records and result.records[0].meta["format_note"] == "extension says mmcif but the content is pdb"
    strict = parse_file(pdb_as_cif, options=ParseOptions(strict_extension=True))
    assert not strict.records and strict.rejects[0].reason.startswith("wrong extension: extension says mmcif")


@pytest.mark.parametrize("name, content, reason", [
    ("empty.pdb", b"", "empty file"),
    ("blank.cif", b"\n  \n", "empty file"),
    ("random.pdb", bytes(range(256)) * 8, "binary content"),
    ("image.cif", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "binary content: the file is a PNG image"),
    ("notes.pdb", b"hello, this is a note\n", "unrecognised content"),
    ("x.pdb.gz", b"\x1f\x8b\x08\x00garbage", "corrupt or truncated gzip data"),
    ("bad.cif", b"data_x\nloop_\n_atom_site.id\n_atom_site.Cartn_x\n1 2 3\n", "malformed mmCIF"),
    ("seq.fasta", b"MKV\n>x\nMKV\n", "unrecognised content"),
    ("header.fasta", b">only_header\n", "empty sequence"),
])
def test_broken_bytes_are_rejected_with_reasons(name, content, reason):
    result = parse_bytes(content, name)
    assert not result.records and len(result.rejects) == 1
    assert result.rejects[0].reason.startswith(reason), result.rejects[0].reason


def test_truncated_files_are_rejected(tmp_path):
    text = text_of("biotite_testdata/1aki.pdb.gz")
    cut_line = text[: text.index("\nATOM", len(text) // 2) + 40]  # inside a coordinate record
    cut_clean = text[: text.index("\nATOM", len(text) // 2) + 1]  # on a line boundary
    for cut, why in ((cut_line, "last coordinate record is cut short"), (cut_clean, "no END record")):
        r = parse_bytes(cut.encode(), "1aki.pdb")
        assert not r.records and why in r.rejects[0].reason
    cif = text_of("biotite_testdata/7gsa.cif.gz")
    r = parse_bytes(cif[: len(cif) // 2 + 7].encode(), "7gsa.cif")
    assert not r.records and r.rejects[0].reason.startswith("malformed mmCIF")
    gz = (DATA_DIR / "biotite_testdata/1aki.pdb.gz").read_bytes()
    (tmp_path / "cut.pdb.gz").write_bytes(gz[: len(gz) // 2])
    assert "truncated gzip" in parse_file(tmp_path / "cut.pdb.gz").rejects[0].reason


def test_size_limits(tmp_path):
    path = DATA_DIR / "biotite_testdata/1aki.pdb.gz"
    small = ParseOptions(max_file_bytes=10_000)
    assert "over the 0 MB limit" in parse_file(path, options=small).rejects[0].reason
    assert "decompressed content exceeds" in parse_bytes(path.read_bytes(), "1aki.pdb.gz", options=ParseOptions(max_file_bytes=40_000)).rejects[0].reason
    long = parse_file(path, options=ParseOptions(max_residues=100))
    assert "129 residues exceeds max_residues=100" in long.rejects[0].reason


def test_fasta_records(tmp_path):
    multi = parse_file(DATA_DIR / "biopython_testdata/swissprot/multi_ex.fasta.gz")
    assert multi.records and not multi.rejects
    assert multi.records[0].id == multi.records[0].accession == "P00750"  # >sp|P00750|TPA_HUMAN ...
    assert all(r.coords is None and not r.has_structure and r.source_format == "fasta" for r in multi.records)
    deeploc = parse_file(DATA_DIR / "deeploc_lightattention/deeploc_val_set.fasta.gz")
    assert len(deeploc.records) > 1000 and deeploc.records[0].accession == deeploc.records[0].id
    f = tmp_path / "mixed.fa"
    f.write_text(">sp|P12345|X_HUMAN d\nMKV-LL\n>ok desc\nmkv\nlla*\n>bad\nMK1\n>ok\nMKV\n>\nMK\n")
    r = parse_file(f)
    assert [(x.id, x.sequence, x.meta) for x in r.records] == [("ok", "MKVLLA", {"description": "desc"})]
    reasons = [x.reason for x in r.rejects]
    assert reasons[0].startswith("sequence contains alignment gaps") and "'1'" in reasons[1]
    assert reasons[2] == "id ok repeats the record at line 3" and reasons[3] == "FASTA header is empty"


def test_reference_pdb_h5_layout(tmp_path):
    import h5py

    afdb = load_records(DATA_DIR / "chlamatlas_afdb/afdb_models/AF-O84043-F1-model_v4.cif.gz")[0]
    path = tmp_path / "pdb.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("O84043")
        g.create_dataset("sequence", data=np.array([afdb.sequence.encode()]))
        pos = afdb.coords.astype(np.float64)
        pos[-2:] = 0.0  # the reference's all-zero "no coordinate" rows
        g.create_dataset("node_position", data=pos)
        z = f.create_group("P0CC05")
        z.create_dataset("sequence", data=np.array([b"MKVL"]))
        z.create_dataset("node_position", data=np.zeros((4, 3)))
        bad = f.create_group("Q46403")
        bad.create_dataset("sequence", data=np.array([b"MKVL"]))
        bad.create_dataset("node_position", data=np.ones((3, 3)))
        f.create_group("empty_group")
    result = parse_file(path)
    assert [r.id for r in result.records] == ["O84043", "P0CC05"]
    rec, seq_only = result.records
    assert rec.accession == "O84043" and rec.sequence == afdb.sequence and rec.source_format == "h5"
    assert rec.coord_mask[:-2].all() and not rec.coord_mask[-2:].any()
    np.testing.assert_allclose(rec.coords[:-2], afdb.coords[:-2])
    assert seq_only.coords is None and not seq_only.has_structure
    assert {r.chain: r.reason for r in result.rejects} == {
        "Q46403": "node_position has 3 rows but the sequence has 4 residues",
        "empty_group": "group lacks sequence, node_position",
    }
    gz = parse_bytes(gzip.compress(path.read_bytes()), "pdb.h5.gz")  # gzipped HDF5 works in memory
    assert [r.id for r in gz.records] == ["O84043", "P0CC05"]


def test_alphafold_model_is_recognised_by_content_when_renamed():
    text = text_of("chlamatlas_afdb/afdb_models/AF-O84033-F1-model_v4.cif.gz").replace("AF-O84033-F1", "my_model")
    result = parse_structure_text(text, "mmcif", "upload.cif")  # no AF-... name left anywhere
    rec = result.records[0]
    assert result.source_format == rec.source_format == "afdb"
    assert (rec.id, rec.accession) == ("upload:A", "O84033")  # accession from _ma_target_ref_db_details
    assert rec.plddt is not None and rec.plddt.min() > 0


def test_microheterogeneity_keeps_the_most_occupied_residue():
    """Two residue names at one position (ALA altloc A 0.30 / SER altloc B 0.70): SER wins."""
    lines = text_of("biotite_testdata/1aki.pdb.gz").splitlines()
    idx = [i for i, ln in enumerate(lines) if ln.startswith("ATOM") and ln[22:26].strip() == "10"]
    res10 = [lines[i] for i in idx]
    ala = [ln[:16] + "A" + ln[17:54] + "  0.30" + ln[60:] for ln in res10]
    ser = []
    for ln in res10[:5]:  # N CA C O CB, the SER conformer's CA moved by +1 Å in x
        x = float(ln[30:38]) + (1.0 if ln[12:16] == " CA " else 0.0)
        ser.append(ln[:16] + "B" + "SER" + ln[20:30] + f"{x:8.3f}" + ln[38:54] + "  0.70" + ln[60:])
    orig = parse_structure_text("\n".join(lines), "pdb", "1aki.pdb").records[0]
    rec = parse_structure_text("\n".join(lines[:idx[0]] + ala + ser + lines[idx[-1] + 1:]), "pdb", "1aki.pdb").records[0]
    i = rec.meta["residue_ids"].index("10")
    assert (orig.sequence[i], rec.sequence[i], rec.meta["sequence_source"]) == ("A", "S", "seqres")
    np.testing.assert_allclose(rec.coords[i] - orig.coords[i], [1.0, 0.0, 0.0], atol=1e-3)
    assert rec.sequence[:i] + rec.sequence[i + 1:] == orig.sequence[:i] + orig.sequence[i + 1:]
