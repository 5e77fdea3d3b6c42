"""The dataset builder end to end on real bundled annotations and a small real protein store."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from dataset_support import N_DEEPLOC, all_rows, small_build, write_small_store

from sepit.cli import main as sepit_main
from sepit.config.base import ConfigError
from sepit.data.build import BuildConfig, BuildError, build_dataset
from sepit.data.build_inputs import default_annotation_files
from sepit.data.instruction_schema import INSTRUCTION_SCHEMA
from sepit.data.readers import read_annotations
from sepit.resources import DATA_DIR
from sepit.structure.store import ProteinStore

QA_SOURCES_FROM_FILES = {"uniprot", "string", "deeploc"}  # generated questions (not imported QA)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = small_build(tmp_path_factory.getbasetemp())
    return out, json.loads((out / "card.json").read_text()), all_rows(out)


def test_counts_reconcile_with_inputs(built):
    out, card, _rows = built
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    inputs = card["inputs"]
    assert inputs["records"] == inputs["used"] + inputs["skipped"] and inputs["reconciles"]
    assert len(skipped) == inputs["skipped"] and all(r["reason"] for r in skipped)
    # the per-file record counts are what the readers yield on the same files
    for path, counts in inputs["per_file"].items():
        assert counts["records"] == len(list(read_annotations(path, id_map=None if "string" not in path else _id_map())))
        assert counts["records"] == counts["used"] + counts["skipped"]
    assert inputs["per_file"][str(out.parent / "deeploc_head.fasta.gz")]["records"] == N_DEEPLOC
    # STRING rows without an accession mapping and placeholder texts are skipped, with reasons
    reasons = Counter(r["reason"].split(":")[0] for r in skipped)
    assert reasons["no usable annotation (no function text and no category labels)"] == 223
    store = card["store"]
    assert store["records"] == store["used"] + store["unused"] == 8 and "AF-O84043-F1:A" in store["unused_ids"]


def _id_map():
    from sepit.data.readers import load_id_map

    return load_id_map(DATA_DIR / "derived" / "proteins.jsonl.gz")


def test_rows_follow_the_contract(built):
    out, card, rows = built
    table = pq.read_table(out / "stage2" / "train.parquet")
    assert table.schema.equals(INSTRUCTION_SCHEMA)
    for stage in (0, 1, 2):
        assert card["examples"][f"stage{stage}"]["total"] == sum(r["stage"] == stage for r in rows) > 0
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    for r in rows:
        assert r["question"].count("<protein>") == 1, r["id"]
        assert r["task"] in ("caption", "open", "yes_no", "multiple_choice") and r["answer"].strip()
        if r["stage"] == 0:
            assert r["task"] == "caption" and r["question"] == "Describe the function of <protein>."
        if r["has_structure"]:
            n = len(r["sequence"])
            assert len(r["coords"]) == 3 * n and len(r["coord_mask"]) == n and any(r["coord_mask"])
        else:
            assert r["coords"] is None and r["coord_mask"] is None
        assert len(r["sequence"]) <= 1022


def test_yes_no_balanced_and_multiple_choice_letters_valid(built):
    _out, _card, rows = built
    per_group: dict = defaultdict(Counter)
    for r in rows:
        if r["task"] == "yes_no" and r["source"] in QA_SOURCES_FROM_FILES:
            per_group[(r["protein_id"], r["category"])][r["answer"]] += 1
    assert len(per_group) > 100
    assert all(c["Yes"] == c["No"] for c in per_group.values())
    mc = [r for r in rows if r["task"] == "multiple_choice"]
    assert len(mc) > 50
    for r in mc:
        idx = ord(r["answer_letter"]) - ord("A")
        assert 0 <= idx < len(r["choices"]) and r["answer"] == f"{r['answer_letter']}) {r['choices'][idx]}"
        assert f"\n{r['answer_letter']}) {r['choices'][idx]}\n" in r["question"]
        assert len(set(r["choices"])) == len(r["choices"])
    imported = [r for r in mc if r["source"] == "deeploc_lightattention"]
    assert len(imported) == 3  # the QA set's own multiple-choice records, kept with their options


def _question_majority(examples) -> float:
    """Share of yes/no answers the majority answer of the same question gets right (in sample)."""
    per_q: dict = defaultdict(Counter)
    for e in examples:
        per_q[e.question][e.answer] += 1
    return sum(max(c.values()) for c in per_q.values()) / sum(sum(c.values()) for c in per_q.values())


def test_the_wording_of_a_yes_no_question_does_not_give_its_answer_away():
    """On every bundled annotation: negatives drawn by label frequency (as positives are) leave the
    question's own majority answer near a coin toss; drawn uniformly over distinct labels, rare
    labels ("Cytoplasm, P-body") were nearly always "No" and the wording alone answered most."""
    from sepit.data.annotations import ProteinAnnotation
    from sepit.data.examples import label_pools
    from sepit.data.questions import yes_no_examples

    anns = [r for path in default_annotation_files() for r in read_annotations(path)
            if isinstance(r, ProteinAnnotation) and r.labels("location")]
    pool = label_pools(anns, ["location"])["location"]
    assert len(anns) > 2000 and len(pool) > 20

    def examples(p):
        return [e for i, a in enumerate(anns) for e in yes_no_examples(a.labels("location"), p, "location", 1, 0, f"p{i}")]

    by_frequency, uniform = examples(pool), examples(list(pool))
    assert Counter(e.answer for e in by_frequency)["Yes"] == len(by_frequency) // 2  # still balanced
    assert _question_majority(uniform) > 0.75
    assert _question_majority(by_frequency) < 0.6


def test_negatives_are_drawn_by_label_frequency():
    import random

    from sepit.data.questions import sample_negatives, yes_no_examples

    pool = {"Nucleus": 90, "Cytoplasm, P-body": 10}
    draws = Counter(sample_negatives(random.Random(i), list(pool), pool, 1)[0] for i in range(2000))
    assert 0.86 < draws["Nucleus"] / 2000 < 0.94
    # distinct labels, k of them, never more than there are
    assert sorted(sample_negatives(random.Random(0), list(pool), pool, 5)) == sorted(pool)
    # a plain label list keeps the uniform draw
    draws = Counter(sample_negatives(random.Random(i), ["a", "b"], ["a", "b"], 1)[0] for i in range(2000))
    assert 0.45 < draws["a"] / 2000 < 0.55
    # yes/no pairs stay balanced and never ask about the protein's own or a related label
    ex = yes_no_examples(["Cell membrane"], {"Cell membrane": 50, "Membrane": 40, "Nucleus": 5}, "location", 1, 0, "P1")
    assert [e.answer for e in ex] == ["Yes", "No"] and '"Nucleus"' in ex[1].question


def test_stage1_open_puts_the_open_questions_into_stage_1_too():
    """The curriculum option: stage 1 = captions + the protein's open questions; stage 2 unchanged."""
    from sepit.data.annotations import ProteinAnnotation
    from sepit.data.examples import annotation_examples, label_pools

    anns = [r for r in read_annotations(DATA_DIR / "biopython_testdata" / "swissprot" / "P04439.txt.gz")
            if isinstance(r, ProteinAnnotation)]
    ann = anns[0]
    pools = label_pools(anns, ["location"])
    args = (ann, "P04439", pools, 0, ["function", "location", "family"], ["location"], 1, 1, 4)
    plain, curriculum = annotation_examples(*args), annotation_examples(*args, open_in_stage1=True)
    by_stage = lambda xs, st: [(e.question, e.answer) for stage, e in xs if stage == st]
    opened = [(e.question, e.answer) for stage, e in plain if stage == 2 and e.task == "open"]
    assert opened
    assert by_stage(curriculum, 2) == by_stage(plain, 2)
    assert by_stage(curriculum, 1) == by_stage(plain, 1) + opened
    assert BuildConfig(stage1_open=True).stage1_open and not BuildConfig().stage1_open


def test_no_protein_in_two_splits_and_no_cross_split_leak(built):
    _out, card, rows = built
    splits: dict = defaultdict(set)
    for r in rows:
        splits[r["protein_id"]].add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert max(card["splits"]["max_cross_split_identity"].values()) < card["splits"]["threshold"] == 0.4


def test_structures_joined_from_the_store(built):
    out, card, rows = built
    store = {r.id: r for r in ProteinStore(out.parent / "store").records()}
    with_structure = {r["protein_id"]: r for r in rows if r["has_structure"]}
    assert set(with_structure) == {"O84033", "O84042", "O84102", "O84130", "O84544", "O84835"}
    row = with_structure["O84033"]
    rec = store[row["store_id"]]
    assert rec.sequence == row["sequence"]  # AFDB model = full UniProt sequence: coordinates as they are
    np.testing.assert_array_equal(np.asarray(row["coords"], np.float32).reshape(-1, 3), rec.coords)
    assert card["proteins"]["with_structure"] == 6
    sequence_only = [r for r in rows if not r["has_structure"]]
    assert sequence_only and all(r["store_id"] is None for r in sequence_only)


def test_refuses_to_overwrite_a_foreign_folder_and_rejects_bad_config(tmp_path):
    (tmp_path / "keep.txt").write_text("not a dataset")
    files = [f for f in default_annotation_files() if "P60904" in f]
    with pytest.raises(BuildError, match="not empty and holds no previous build"):
        build_dataset(BuildConfig(annotations=files, out=str(tmp_path), executor="local"))
    assert (tmp_path / "keep.txt").exists()
    with pytest.raises(ConfigError, match="split_ratios"):
        BuildConfig(split_ratios=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="long_sequences"):
        BuildConfig(long_sequences="drop")


def test_cli_builds_from_a_store_and_reports_errors(tmp_path, capsys):
    store = write_small_store(tmp_path / "store")
    swiss = [f for f in default_annotation_files() if "swissprot" in f]
    out = tmp_path / "ds"
    rc = sepit_main(["build-dataset", "--proteins", str(store), "--annotations", *swiss,
                     "--out", str(out), "--seed", "3", "executor=local", "mc_choices=3"])
    assert rc == 0 and (out / "card.md").is_file() and (out / "lengths.png").stat().st_size > 1000
    card = json.loads((out / "card.json").read_text())
    assert card["config"]["seed"] == 3 and card["inputs"]["records"] == 24
    mc = [r for r in all_rows(out) if r["task"] == "multiple_choice"]
    assert mc and all(len(r["choices"]) == 3 for r in mc)
    assert "inputs: 24 records" in capsys.readouterr().out
    # a rebuild replaces the previous build; a broken input file is reported, not fatal
    broken = tmp_path / "broken.txt"
    broken.write_text("ID   BROKEN_HUMAN   Reviewed;   5 AA.\nSQ   SEQUENCE   5 AA;\n     MKV\n//\n")
    rc = sepit_main(["build-dataset", "--annotations", *swiss, str(broken), "--out", str(out), "executor=local"])
    card = json.loads((out / "card.json").read_text())
    assert rc == 0 and card["config"]["seed"] == 0 and card["inputs"]["records"] == 25
    bad = [r for r in pq.read_table(out / "skipped.parquet").to_pylist() if r["source_file"] == str(broken)]
    assert len(bad) == 1 and bad[0]["stage"] == "read" and "has no AC line" in bad[0]["reason"]
    rc = sepit_main(["build-dataset", "--proteins", str(tmp_path / "nostore"), "--annotations", *swiss,
                     "--out", str(tmp_path / "ds2")])
    assert rc == 2 and "is not a protein store" in capsys.readouterr().err
