"""Annotation readers on the bundled real files, and their errors on malformed copies."""

from __future__ import annotations

import gzip
import json

import pytest

from sepit.data.annotations import AnnotationFormatError
from sepit.data.readers import detect_format, load_id_map, read_annotations
from sepit.data.readers.fasta_labels import parse_label, read_labelled_fasta
from sepit.data.readers.mol_instructions import read_mol_instructions
from sepit.data.readers.qa_jsonl import read_qa_jsonl
from sepit.data.readers.reference_jsonl import read_reference_jsonl
from sepit.data.readers.tables import read_annotation_table
from sepit.data.readers.uniprot import read_uniprot_text, read_uniprot_xml
from sepit.resources import data_path

SWISS = ("biopython_testdata", "swissprot")


def _text(*parts: str) -> str:
    with gzip.open(data_path(*parts), "rt") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def id_map():
    return load_id_map(data_path("derived", "proteins.jsonl.gz"))


# --------------------------------------------------------------------------- UniProt
def test_uniprot_flat_file_fields_current_layout():
    (ann,) = read_uniprot_text(data_path(*SWISS, "P60904.txt.gz"))
    assert ann.accession == "P60904" and len(ann.sequence) == 198
    assert ann.name == "DnaJ homolog subfamily C member 5"
    assert ann.function.startswith("Acts as a co-chaperone for the SNARE protein SNAP-25")
    assert "{ECO" not in ann.function and "calcium-dependent" in ann.function  # hyphen-wrapped word rejoined
    assert ann.locations[:2] == ["Cytoplasm, cytosol", "Membrane"]
    assert ann.domains_motifs == ["J (13-82)"]
    assert "Chaperone" in ann.keywords
    assert {("GO:0005829", "C", "cytosol")} <= {(g.id, g.aspect, g.term) for g in ann.go}


def test_uniprot_flat_file_ec_reaction_and_old_layout():
    (chs,) = read_uniprot_text(data_path(*SWISS, "O23729.txt.gz"))
    assert chs.ec == ["2.3.1.74"]
    assert chs.catalytic_activity == ["4-coumaroyl-CoA + 2 H(+) + 3 malonyl-CoA = 2',4,4',6'-tetrahydroxychalcone + 3 CO2 + 4 CoA"]
    assert chs.family == "Belongs to the thiolase-like superfamily. Chalcone/stilbene synthases family."
    (fos,) = read_uniprot_text(data_path(*SWISS, "sp016.txt.gz"))  # pre-2019 feature table
    assert "Leucine-zipper (165-193)" in fos.domains_motifs
    assert fos.family == "Belongs to the bZIP family. Fos subfamily."
    assert fos.labels("family") == ["bZIP family"]
    multi = list(read_uniprot_text(data_path(*SWISS, "multi_ex.txt.gz")))
    assert [a.record for a in multi][:2] == ["entry 1 (P00750)", "entry 2 (P56540)"] and len(multi) == 8


def test_uniprot_xml_agrees_with_flat_file():
    (txt,) = read_uniprot_text(data_path(*SWISS, "Q13639.txt.gz"))
    (xml,) = read_uniprot_xml(data_path(*SWISS, "Q13639.xml.gz"))
    assert (xml.accession, xml.sequence, xml.keywords, xml.locations) == (txt.accession, txt.sequence, txt.keywords, txt.locations)
    (muc,) = read_uniprot_xml(data_path(*SWISS, "P97881.xml.gz"))
    assert muc.domains_motifs[:2] == ["EGF-like 1 (210-249)", "SEA (250-366)"]
    assert muc.location_text == "Cell membrane; Single-pass type I membrane protein. Secreted."
    assert len(list(read_uniprot_xml(data_path(*SWISS, "multi_ex.xml.gz")))) == 8


def test_uniprot_flat_file_errors_name_file_and_line(tmp_path):
    good = _text(*SWISS, "P68308.txt.gz")
    lines = good.splitlines()
    sq = next(i for i, l in enumerate(lines) if l.startswith("SQ "))
    bad_len = tmp_path / "bad_len.txt"
    bad_len.write_text("\n".join(lines[:sq + 1] + [lines[sq + 1][:-3]] + lines[sq + 2:]) + "\n")
    with pytest.raises(AnnotationFormatError, match=r"bad_len\.txt \(entry 1\).*line %d: P68308: sequence has \d+ residues but SQ says" % (sq + 1)):
        list(read_uniprot_text(bad_len))
    no_ac = tmp_path / "no_ac.txt"
    no_ac.write_text("\n".join(l for l in lines if not l.startswith("AC ")) + "\n")
    with pytest.raises(AnnotationFormatError, match="has no AC line"):
        list(read_uniprot_text(no_ac))
    # lenient mode: the broken entry is reported, the good one after it is still read
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(no_ac.read_text() + good)
    errors: list = []
    got = list(read_uniprot_text(mixed, errors))
    assert [a.accession for a in got] == ["P68308"] and len(errors) == 1 and "mixed.txt" in str(errors[0])
    unterminated = tmp_path / "cut.txt"
    unterminated.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(AnnotationFormatError, match="not terminated by '//'"):
        list(read_uniprot_text(unterminated))


def test_uniprot_xml_errors(tmp_path):
    xml = _text(*SWISS, "P84001.xml.gz")
    cut = tmp_path / "cut.xml"
    cut.write_text(xml[: len(xml) // 2])
    with pytest.raises(AnnotationFormatError, match=r"cut\.xml:\d+: not well-formed XML"):
        list(read_uniprot_xml(cut))
    noacc = tmp_path / "noacc.xml"
    noacc.write_text(xml.replace("<accession>P84001</accession>", ""))
    with pytest.raises(AnnotationFormatError, match=r"entry 1.*no <accession>"):
        list(read_uniprot_xml(noacc))


# --------------------------------------------------------------------------- STRING table
def test_string_table_with_id_map(id_map):
    anns = list(read_annotation_table(data_path("string_v12_ctrachomatis", "string_ct_protein_info_v12.txt.gz"),
                                      id_map=id_map))
    assert len(anns) == 874
    mapped = [a for a in anns if a.accession]
    assert len(mapped) == 726 and all(a.sequence for a in mapped)
    gat_b = next(a for a in anns if a.external_id == "272561.CT_004")
    assert gat_b.family == "Belongs to the GatB/GatE family. GatB subfamily."
    assert "Belongs to" not in gat_b.function and gat_b.function.startswith("Glu-tRNA Gln Amidotransferase B Subunit")
    hypo = next(a for a in anns if a.external_id == "272561.CT_001")
    assert hypo.function is None and not hypo.has_content()


def test_string_table_errors(tmp_path, id_map):
    lines = _text("string_v12_ctrachomatis", "string_ct_protein_info_v12.txt.gz").splitlines()
    short = tmp_path / "short.tsv"
    short.write_text("\n".join(lines[:3] + ["272561.CT_999\tonly-two-fields"] + lines[3:5]) + "\n")
    with pytest.raises(AnnotationFormatError, match=r"short\.tsv:4: row has 2 fields, header has 4"):
        list(read_annotation_table(short))
    wrong_size = tmp_path / "size.tsv"
    cells = lines[2].split("\t")
    cells[2] = str(int(cells[2]) + 5)
    wrong_size.write_text("\n".join([lines[0], "\t".join(cells)]) + "\n")
    with pytest.raises(AnnotationFormatError, match=r"size\.tsv:2: 272561\.CT_003: protein_size=\d+ but the sequence has"):
        list(read_annotation_table(wrong_size, id_map=id_map))
    no_col = tmp_path / "nocol.tsv"
    no_col.write_text("#string_protein_id\tpreferred_name\n272561.CT_001\tCT_001\n")
    with pytest.raises(AnnotationFormatError, match="header lacks column"):
        list(read_annotation_table(no_col))


# --------------------------------------------------------------------------- DeepLoc FASTA
def test_deeploc_fasta_labels():
    anns = list(read_labelled_fasta(data_path("deeploc_lightattention", "deeploc_test_set.fasta.gz")))
    assert len(anns) == 2768
    first = anns[0]
    assert (first.accession, first.locations, first.record) == ("Q9H400", ["Cell membrane"], "line 1")
    assert parse_label("Cytoplasm-Nucleus-U") == (["Cytoplasm", "Nucleus"], "U")
    assert parse_label("Endoplasmic.reticulum-M") == (["Endoplasmic reticulum"], "M")


def test_deeploc_fasta_errors(tmp_path):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">P1 Nucleus-Q\nMKV\n>P2 Nucleus-M\nMK1V\n>P3\nMKV\n>P4 Cytoplasm-S\nMKVL\n")
    errors: list = []
    got = list(read_labelled_fasta(bad, errors))
    assert [a.accession for a in got] == ["P4"]
    msgs = [str(e) for e in errors]
    assert "bad.fasta:1: membrane flag 'Q'" in msgs[0]
    assert "bad.fasta:3: record P2: sequence has non-amino-acid characters '1'" in msgs[1]
    assert "bad.fasta:5: header '>P3' lacks a 'Location-Flag' label" in msgs[2]
    with pytest.raises(AnnotationFormatError, match="bad.fasta:1"):
        list(read_labelled_fasta(bad))


# --------------------------------------------------------------------------- QA JSONL
def test_qa_jsonl_imports_every_record():
    items = list(read_qa_jsonl(data_path("derived", "qa.jsonl.gz")))
    assert len(items) == 1183
    mc = [i for i in items if i.task == "multiple_choice"]
    assert mc and all(i.answer in i.choices for i in mc)
    assert {i.answer for i in items if i.task == "yes_no"} == {"Yes", "No"}
    assert {i.category for i in items} >= {"function", "location", "keywords", "domains_motifs", "ec"}


def test_qa_jsonl_errors(tmp_path):
    row = json.loads(_text("derived", "qa.jsonl.gz").splitlines()[0])
    bad = tmp_path / "qa.jsonl"
    bad.write_text("\n".join([
        json.dumps(row), "{not json", json.dumps({**row, "task_type": "poetry"}),
        json.dumps({**row, "task_type": "subcellular_location_mc", "choices": ["A", "B"], "answer": "C"}),
        json.dumps({**row, "task_type": "yes_no", "answer": "Maybe"}),
    ]) + "\n")
    errors: list = []
    assert len(list(read_qa_jsonl(bad, errors))) == 1
    assert [e.line for e in errors] == [2, 3, 4, 5]
    assert "not valid JSON" in errors[0].reason and "unknown task_type 'poetry'" in errors[1].reason
    assert "is not one of the choices" in errors[2].reason and "not Yes or No" in errors[3].reason


# --------------------------------------------------------------------------- reference JSONL
def test_reference_jsonl_caption_and_conversation(tmp_path):
    qa = [json.loads(l) for l in _text("derived", "qa.jsonl.gz").splitlines()[:3]]
    (tmp_path / "stage0").mkdir()
    (tmp_path / "stage2").mkdir()
    s0 = tmp_path / "stage0" / "train.jsonl"
    s0.write_text("".join(json.dumps({"id": q["accession"], "caption": q["answer"]}) + "\n" for q in qa))
    s2 = tmp_path / "stage2" / "train.jsonl"
    s2.write_text(json.dumps({"id": qa[0]["accession"], "conversation": [
        {"role": "user", "content": "<protein>\n" + qa[0]["question"]}, {"role": "assistant", "content": qa[0]["answer"]},
        {"role": "user", "content": "Is it an enzyme?"}, {"role": "assistant", "content": "Yes"}]}) + "\n")
    caps = list(read_reference_jsonl(s0))
    assert [(c.stage, c.task, c.answer) for c in caps] == [(0, "caption", q["answer"]) for q in qa]
    conv = list(read_reference_jsonl(s2))
    assert [(c.stage, c.task, c.record) for c in conv] == [(2, "open", "line 1"), (2, "yes_no", "line 1")]
    assert detect_format(s0) == "reference-jsonl"


def test_reference_jsonl_errors(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join([
        json.dumps({"id": "P1", "conversation": [{"role": "human", "content": "hi"}]}),
        json.dumps({"id": "P1", "conversation": [{"role": "user", "content": "<protein> hi"}]}),
        json.dumps({"conversation": []}),
    ]) + "\n")
    errors: list = []
    assert list(read_reference_jsonl(bad, errors)) == []
    assert [e.line for e in errors] == [1, 2, 3]
    assert "role 'human'" in errors[0].reason and "unanswered user turn" in errors[1].reason
    assert "non-empty string 'id'" in errors[2].reason


# --------------------------------------------------------------------------- Mol-Instructions
def test_mol_instructions_json(tmp_path):
    qa = [json.loads(l) for l in _text("derived", "qa.jsonl.gz").splitlines()[:2]]
    path = tmp_path / "protein_function.json"
    path.write_text(json.dumps([
        {"instruction": "What does this protein do?", "input": f"```\n{qa[0]['sequence']}\n```",
         "output": qa[0]["answer"], "metadata": {"protein_accession": qa[0]["accession"]}},
        {"instruction": "Design a protein that binds heme.", "input": "Design a heme-binding protein.", "output": "MKV"},
    ]))
    errors: list = []
    items = list(read_mol_instructions(path, errors))
    assert len(items) == 1 and items[0].sequence == qa[0]["sequence"] and items[0].category == "function"
    assert items[0].accession == qa[0]["accession"] and items[0].record == "record 0"
    assert "record 1" in str(errors[0]) and "not a protein sequence" in errors[0].reason
    assert detect_format(path) == "mol-instructions"


def test_detect_format_on_bundled_files():
    assert detect_format(data_path(*SWISS, "P60904.txt.gz")) == "uniprot-text"
    assert detect_format(data_path(*SWISS, "P84001.xml.gz")) == "uniprot-xml"
    assert detect_format(data_path("string_v12_ctrachomatis", "string_ct_protein_info_v12.txt.gz")) == "string"
    assert detect_format(data_path("deeploc_lightattention", "deeploc_val_set.fasta.gz")) == "labelled-fasta"
    assert detect_format(data_path("derived", "qa.jsonl.gz")) == "qa-jsonl"
    with pytest.raises(AnnotationFormatError, match="cannot tell the annotation format"):
        detect_format(data_path("pika_sample", "sample_metrics.csv.gz"))
    with pytest.raises(AnnotationFormatError, match="file does not exist"):
        list(read_annotations("/nonexistent/file.txt", "uniprot-text"))
