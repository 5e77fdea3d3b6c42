"""Inputs users actually have: STRING's own id files and Mol-Instructions' protein task files.

STRING: no ``protein.aliases`` / ``protein.sequences`` excerpt is bundled, so the tests write
files in STRING's real layout whose rows are the bundled real ids, accessions and sequences
(``derived/proteins.jsonl``: STRING v12 ids of C. trachomatis joined to UniProt through AFDB),
and read the bundled real STRING ``protein.info`` with them.  Mol-Instructions: no file is
bundled; the task files are written in its real layout from bundled real QA records.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from dataset_support import all_rows, write_small_store

from sepit.data.annotations import AnnotationFormatError
from sepit.data.build import BuildConfig, build_dataset
from sepit.data.build_inputs import InputLedger, load_id_maps, read_inputs
from sepit.data.readers import detect_format, load_id_map
from sepit.data.readers.mol_instructions import TASK_CATEGORIES, read_mol_instructions
from sepit.data.readers.string_ids import load_string_aliases
from sepit.data.readers.tables import read_annotation_table
from sepit.resources import DATA_DIR

STRING_INFO = DATA_DIR / "string_v12_ctrachomatis" / "string_ct_protein_info_v12.txt.gz"
DERIVED = DATA_DIR / "derived" / "proteins.jsonl.gz"
#: accessions of the small store's AFDB models (tests/dataset_support.py)
STORE_ACCESSIONS = {"O84033", "O84042", "O84102", "O84130", "O84544", "O84835", "O84043"}


def _derived_string_records() -> list[dict]:
    with gzip.open(DERIVED, "rt") as fh:
        return [r for r in map(json.loads, fh) if r.get("string_id")]


def _info_rows() -> list[list[str]]:
    with gzip.open(STRING_INFO, "rt") as fh:
        return [line.rstrip("\n").split("\t") for line in fh]


def write_string_id_files(root, extra_alias_rows=()) -> tuple:
    """``protein.aliases`` and ``protein.sequences`` in STRING v12's layout, from bundled real data."""
    records = _derived_string_records()
    rows = [("#string_protein_id", "alias", "source")]
    for r in records:
        sid, bare = r["string_id"], r["string_id"].split(".", 1)[1]
        rows += [(sid, r["accession"], "UniProt_AC"), (sid, r["entry_name"], "UniProt_ID"),
                 (sid, bare, "UniProt_GN_OrderedLocusNames"), (sid, r["string_preferred_name"], "UniProt_GN_Name"),
                 (sid, r["accession"], "BLAST_UniProt_AC")]
    mapped = {r["string_id"] for r in records}
    for cells in _info_rows()[1:]:  # STRING proteins the derived join did not map: no UniProt alias
        if cells[0] not in mapped:
            rows.append((cells[0], cells[0].split(".", 1)[1], "UniProt_GN_OrderedLocusNames"))
    rows += list(extra_alias_rows)
    aliases = root / "272561.protein.aliases.v12.0.txt.gz"
    with gzip.open(aliases, "wt") as fh:
        fh.writelines("\t".join(r) + "\n" for r in rows)
    sequences = root / "272561.protein.sequences.v12.0.fa.gz"
    with gzip.open(sequences, "wt") as fh:
        for r in records:  # STRING wraps sequence lines
            seq = r["sequence"]
            fh.write(f">{r['string_id']}\n" + "".join(seq[i:i + 60] + "\n" for i in range(0, len(seq), 60)))
    return aliases, sequences


def _view(anns) -> list[tuple]:
    return [(a.record, a.external_id, a.accession, a.sequence, a.function, a.family) for a in anns]


# --------------------------------------------------------------------------- STRING protein.aliases
def test_string_aliases_give_the_derived_maps_join(tmp_path):
    aliases, sequences = write_string_id_files(tmp_path)
    derived = list(read_annotation_table(STRING_INFO, id_map=load_id_map(DERIVED)))
    string_map = load_id_maps([str(aliases), str(sequences)])
    from_string = list(read_annotation_table(STRING_INFO, id_map=string_map))
    assert len(derived) == 874 and _view(from_string) == _view(derived)
    assert sum(a.accession is not None for a in from_string) == 726
    # aliases alone: the same accessions, no sequences (the store supplies those)
    only_aliases = list(read_annotation_table(STRING_INFO, id_map=load_id_map(aliases)))
    assert [a.accession for a in only_aliases] == [a.accession for a in derived]
    assert not any(a.sequence for a in only_aliases)
    assert string_map.notes == [
        f"{aliases}: STRING aliases for 874 proteins: 726 -> one UniProt accession, 0 ambiguous (several "
        "accessions; rows using them are skipped), 148 without a UniProt accession; 726 locus-tag keys added, "
        "0 shared by several proteins and not used"]


def test_string_aliases_are_recognised_and_refused_as_annotations(tmp_path):
    aliases, sequences = write_string_id_files(tmp_path)
    for path in (aliases, sequences):
        with pytest.raises(AnnotationFormatError, match="STRING id file.*--id-maps"):
            detect_format(path)
    plain = tmp_path / "my_ids.tsv"  # recognised by the header, whatever the name
    plain.write_text("#string_protein_id\talias\tsource\n272561.CT_004\tO84007\tUniProt_AC\n")
    assert load_id_map(plain)["272561.CT_004"].accession == "O84007"
    bad = tmp_path / "bad.protein.aliases.v12.0.txt"
    bad.write_text("#string_protein_id\talias\tsource\n272561.CT_004\tO84007\n")
    with pytest.raises(AnnotationFormatError, match=r"bad\.protein\.aliases\.v12\.0\.txt:2: expected 3 tab-separated"):
        load_id_map(bad)


def test_ambiguous_string_ids_are_reported_not_guessed(tmp_path):
    aliases, _ = write_string_id_files(tmp_path, extra_alias_rows=[
        ("272561.CT_004", "O84006", "UniProt_AC"),  # a second accession (gatA's) for gatB
        ("272561.CT_005", "O84008", "BLAST_UniProt_AC Ensembl_UniProt_AC"),  # v11 style; below UniProt_AC
        ("272561.CT_003", "CT_005", "UniProt_GN_OrderedLocusNames"),  # a locus tag two proteins claim
    ])
    parsed = load_string_aliases(aliases)
    assert parsed.ambiguous["272561.CT_004"] == ("O84006", "O84007") and "272561.CT_004" not in parsed.accession
    assert parsed.accession["272561.CT_005"] == next(
        r["accession"] for r in _derived_string_records() if r["string_id"] == "272561.CT_005")
    assert parsed.accession["CT_003"] == "O84006" and "CT_005" not in parsed.accession  # collision: unused
    assert parsed.ambiguous["CT_004"] == ("O84006", "O84007") and parsed.alias_collisions == 1
    errors: list = []
    anns = list(read_annotation_table(STRING_INFO, id_map=load_id_map(aliases), errors=errors))
    assert len(anns) == 873 and len(errors) == 1
    assert errors[0].record == "line 4" and errors[0].reason.startswith(
        "272561.CT_004: ambiguous in the id map") and "O84006, O84007; not guessed" in errors[0].reason


def test_locus_tag_ids_map_through_aliases(tmp_path):
    aliases, _ = write_string_id_files(tmp_path)
    rows = _info_rows()
    bare = tmp_path / "ct_protein_info_locus_tags.tsv"  # the same table keyed by locus tag (CT_004)
    bare.write_text("\n".join("\t".join([c[0] if i == 0 else c[0].split(".", 1)[1], *c[1:]])
                              for i, c in enumerate(rows)) + "\n")
    id_map = load_id_map(aliases)
    by_locus = list(read_annotation_table(bare, id_map=id_map))
    by_string = list(read_annotation_table(STRING_INFO, id_map=id_map))
    assert [a.accession for a in by_locus] == [a.accession for a in by_string]


@pytest.fixture(scope="module")
def string_builds(tmp_path_factory):
    """One small store, a real protein.info excerpt, built with our derived map and with STRING's files."""
    root = tmp_path_factory.mktemp("string_user")
    store = write_small_store(root / "store")
    aliases, sequences = write_string_id_files(root)
    accession_of = {r["string_id"]: r["accession"] for r in _derived_string_records()}
    rows = _info_rows()
    keep = [c for c in rows[1:] if accession_of.get(c[0]) in STORE_ACCESSIONS] + rows[1:41]
    info = root / "272561.protein.info.v12.0.txt"
    info.write_text("\n".join("\t".join(c) for c in [rows[0], *keep]) + "\n")
    out = {}
    for name, maps in {"derived": [str(DERIVED)], "string": [str(aliases), str(sequences)],
                       "aliases_only": [str(aliases)]}.items():
        build_dataset(BuildConfig(proteins=str(store), annotations=[str(info)], id_maps=maps,
                                  out=str(root / name), executor="local", seed=3))
        out[name] = root / name
    return out


def test_string_user_builds_the_same_dataset(string_builds):
    def key(r):
        return r["id"]

    derived = sorted(all_rows(string_builds["derived"]), key=key)
    string = sorted(all_rows(string_builds["string"]), key=key)
    assert derived and string == derived
    skipped = [pq.read_table(string_builds[n] / "skipped.parquet").to_pylist() for n in ("derived", "string")]
    assert skipped[0] == skipped[1]
    # aliases without sequences: every protein the store holds joins exactly as with our map
    def joined(rows):
        return {(r["accession"], r["store_id"], r["sequence"], tuple(r["coord_mask"]), r["answer"])
                for r in rows if r["stage"] == 0 and r["has_structure"]}

    only_aliases = all_rows(string_builds["aliases_only"])
    assert joined(only_aliases) == joined(derived) and len(joined(derived)) >= 5
    assert {r["accession"] for r in only_aliases} == {r["accession"] for r in derived if r["has_structure"]}


# --------------------------------------------------------------------------- Mol-Instructions tasks
def _qa(task_type: str, n: int) -> list[dict]:
    with gzip.open(DATA_DIR / "derived" / "qa.jsonl.gz", "rt") as fh:
        return [r for r in map(json.loads, fh) if r["task_type"] == task_type][:n]


def _mol_record(qa: dict, **extra) -> dict:
    return {"instruction": qa["question"], "input": f"```\n{qa['sequence']}\n```", "output": qa["answer"],
            "metadata": {"protein_accession": qa["accession"]}, **extra}


def _design_record(qa: dict, **extra) -> dict:
    """protein_design: a text description in, a sequence out."""
    return {"instruction": "Design a protein sequence that fits the description below.",
            "input": qa["answer"], "output": f"```\n{qa['sequence']}\n```", **extra}


def write_mol_instruction_files(root) -> dict[str, object]:
    files = {
        "domain_motif": [_mol_record(q) for q in _qa("domain_motif", 3)],
        "catalytic_activity": [_mol_record(q) for q in _qa("catalytic_activity", 2)],
        "general_function": [_mol_record(q) for q in _qa("function_description", 2)],
        "protein_function": [_mol_record(q) for q in _qa("function_description", 4)[2:]],
        "protein_design": [_design_record(q) for q in _qa("function_description", 3)],
    }
    paths = {}
    for task, records in files.items():
        paths[task] = root / f"{task}.json"
        paths[task].write_text(json.dumps(records, indent=1))
    fn = _qa("function_description", 6)
    combined = [_mol_record(fn[4], task="general_function"), _design_record(fn[5], task="protein_design"),
                _mol_record(fn[4], metadata={"task": "molecular_description_generation"}),
                _mol_record(fn[5], task="molecular_description_generation")]
    paths["combined"] = root / "protein_tasks.jsonl"
    paths["combined"].write_text("\n".join(json.dumps(r) for r in combined) + "\n")
    return paths


def test_mol_instructions_task_names_map_to_categories(tmp_path):
    paths = write_mol_instruction_files(tmp_path)
    for task, category in TASK_CATEGORIES.items():
        items = list(read_mol_instructions(paths[task]))
        assert items and {i.category for i in items} == {category}, task
        assert all(i.sequence and i.accession and i.task == "open" for i in items)
    gz = tmp_path / "domain_motif_train.json.gz"  # compressed, with a split suffix
    gz.write_bytes(gzip.compress(paths["domain_motif"].read_bytes()))
    assert [i.category for i in read_mol_instructions(gz)] == ["domains_motifs"] * 3
    with pytest.raises(AnnotationFormatError, match=r"protein_design\.json \(record 0\): Mol-Instructions task "
                                                    r"'protein_design' not used: its input is a text description"):
        list(read_mol_instructions(paths["protein_design"]))


def test_unused_and_unknown_tasks_are_counted_per_name(tmp_path, capsys):
    paths = write_mol_instruction_files(tmp_path)
    ledger = InputLedger()
    records = read_inputs([str(p) for p in paths.values()], {}, ledger)
    assert Counter(r.category for r in records) == {"domains_motifs": 3, "catalytic_activity": 2, "function": 5}
    assert len(ledger.seen) == 16 and len(ledger.reasons) == 16 - len(records) == 6
    combined_note = (f"{paths['combined']}: Mol-Instructions records skipped by task (not used or unknown): "
                     "'molecular_description_generation': 2, 'protein_design': 1")
    design_note = (f"{paths['protein_design']}: Mol-Instructions records skipped by task (not used or unknown): "
                   "'protein_design': 3")
    assert ledger.notes == [design_note, combined_note]
    assert f"warning: {combined_note}\n" in capsys.readouterr().err
    reasons = Counter(reason.split(":")[0] for _stage, reason in ledger.reasons.values())
    assert reasons == {"Mol-Instructions task 'protein_design' not used": 4,
                       "Mol-Instructions task 'molecular_description_generation' is unknown (known": 2}


def test_mol_instructions_build_reports_tasks_in_the_card(tmp_path):
    paths = write_mol_instruction_files(tmp_path)
    card = build_dataset(BuildConfig(annotations=[str(paths["protein_design"]), str(paths["combined"])],
                                     id_maps=[], out=str(tmp_path / "ds"), executor="local"))
    inputs = card["inputs"]
    assert inputs["records"] == 7 and inputs["used"] == 1 and inputs["skipped"] == 6 and inputs["reconciles"]
    top = dict((reason.split(":")[1].strip(), n) for reason, n in inputs["top_skip_reasons"])
    assert top == {"Mol-Instructions task 'protein_design' not used": 4,
                   "Mol-Instructions task 'molecular_description_generation' is unknown (known": 2}
    skipped = pq.read_table(tmp_path / "ds" / "skipped.parquet").to_pylist()
    assert {(r["source_file"], r["record"]) for r in skipped} >= {(str(paths["combined"]), "line 4")}
