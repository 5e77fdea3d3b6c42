"""SepitProcessor: the same ids as the chat template gives, save/load with the model folder (also
folders written before the processor existed), collation; and the import graph: ``sepit.models``
never imports ``sepit.data`` and the packages import each other without a cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from lm_support import load_lm, save_lm

from sepit.data import prompts
from sepit.data.prompts import IGNORE_INDEX
from sepit.processing import ProcessorError, SepitProcessor, generate_answers

SEPIT = Path(__file__).resolve().parents[1] / "sepit"
SEQS = ["MSLEQKKGADIISKILQIQNSIGK", "MVLSPADKTNVKAAW"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _imports(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (module level or inside functions)."""
    package = list(path.relative_to(SEPIT.parent).with_suffix("").parts)[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_models_never_import_data():
    offenders = {str(p.relative_to(SEPIT.parent)): name for p in sorted((SEPIT / "models").rglob("*.py"))
                 for name in _imports(p) if name == "sepit.data" or name.startswith("sepit.data.")}
    assert not offenders, f"sepit/models imports sepit.data: {offenders}"


def test_importing_every_model_module_loads_no_data_module():
    modules = sorted(f"sepit.models.{p.stem}" for p in (SEPIT / "models").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m == 'sepit.data' or m.startswith('sepit.data.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_sepit_packages_import_each_other_without_a_cycle():
    edges: dict[str, set[str]] = {}
    for path in SEPIT.rglob("*.py"):
        parts = path.relative_to(SEPIT.parent).with_suffix("").parts
        source = _package(".".join(p for p in parts if p != "__init__"))
        for name in _imports(path):
            target = _package(name)
            if name.startswith("sepit.") and target != source and (SEPIT.parent / target.replace(".", "/")).exists():
                edges.setdefault(source, set()).add(target)
    assert "sepit.data" not in edges.get("sepit.models", set())

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        for nxt in sorted(edges.get(node, ())):
            found = cycle_from(nxt, path + [node])
            if found:
                return found
        return None

    for start in sorted(edges):
        cycle = cycle_from(start, [])
        assert cycle is None, f"import cycle between packages: {' -> '.join(cycle)}"


def test_prompt_ids_are_the_chat_templates_and_unchanged(lm):
    _, processor = lm
    question, answer = "Is <protein> an enzyme?", "It binds ATP."
    ids = processor.encode_prompt(question)
    assert ids == prompts.encode_prompt(processor.tokenizer, question)
    # The ids of the bundled-text BPE (tiny preset) before the processor existed: after the system
    # turn (bos, system text, eos), the user turn with <bop><protein><eop> and the assistant header.
    assert len(ids) == 120 and ids[0] == processor.token_ids.bos
    assert ids[-27:] == [205, 34, 98, 91, 920, 98, 36, 205, 330, 227, 4, 5, 6, 311, 631, 37, 2, 205, 34, 98, 594, 685,
                         315, 466, 98, 36, 205]
    ex = processor.encode_example(question, answer)
    assert ex == prompts.encode_example(processor.tokenizer, question, answer)
    assert ex["input_ids"][120:] == [47, 90, 333, 753, 432, 20, 2] == processor.encode_answer(answer)
    assert ex["labels"] == [IGNORE_INDEX] * 120 + ex["input_ids"][120:]


def test_save_load_roundtrip_with_the_model_folder(lm, tmp_path):
    model, processor = lm
    model.config.crop_residues = 12  # what a training stage records at export
    try:
        folder = save_lm(model, processor, tmp_path / "m")
    finally:
        model.config.crop_residues = None
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    loaded = SepitProcessor.from_pretrained(folder)
    assert (loaded.crop_residues, loaded.max_residues, loaded.alphabet_name) == (12, 1022, "ESM-1b")
    assert loaded.token_ids == processor.token_ids and loaded.vocab_size == processor.vocab_size
    for q in ("What does <protein> do?", "Where is this protein found in the cell?"):
        assert loaded.encode_prompt(q) == processor.encode_prompt(q)
    assert int(loaded.protein_batch([(SEQS[0], None, None)]).lengths[0]) == 12  # the model's crop
    with pytest.raises(ProcessorError, match="no config.json"):
        SepitProcessor.from_pretrained(tmp_path)


def test_folders_written_before_the_processor_still_load(lm, tmp_path):
    """Older exports have no token_ids in config.json: the model reads them from tokenizer/."""
    model, processor = lm
    folder = save_lm(model, processor, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["token_ids"]
    (folder / "config.json").write_text(json.dumps(config))
    old, old_processor = load_lm(folder)
    assert old.token_ids == model.token_ids
    q, p = ["What does <protein> do?"], [(SEQS[0], None, None)]
    assert (generate_answers(old, old_processor, q, p, max_new_tokens=4)
            == generate_answers(model, processor, q, p, max_new_tokens=4))


def test_collation_pads_masks_and_labels(lm):
    _, processor = lm
    prompts_ = [processor.encode_prompt("What does <protein> do?"), processor.encode_prompt("Is <protein> an enzyme?")]
    inputs = processor.generation_inputs(["What does <protein> do?", "Is <protein> an enzyme?"],
                                         [(SEQS[0], None, None), (SEQS[1], None, None)])
    width = max(len(p) for p in prompts_)
    for b, p in enumerate(prompts_):  # left padding for generation
        assert inputs["input_ids"][b, width - len(p):].tolist() == p
        assert inputs["attention_mask"][b].tolist() == [0] * (width - len(p)) + [1] * len(p)
        assert (inputs["input_ids"][b, :width - len(p)] == processor.token_ids.pad).all()
    assert inputs["protein"].lengths.tolist() == [len(s) for s in SEQS]
    assert inputs["protein"].select([1]).tokens.shape == (1, len(SEQS[1]) + 2)
    examples = [(e["input_ids"], e["labels"]) for e in (processor.encode_example("What does <protein> do?", "Binds."),
                                                         processor.encode_example("Is <protein> an enzyme?", "Yes"))]
    batch = processor.collate_training(examples, [(SEQS[0], None, None), (SEQS[1], None, None)], max_residues=10)
    for b, (ids, labels) in enumerate(examples):  # right padding for training, labels IGNORE_INDEX on padding
        assert batch["input_ids"][b, :len(ids)].tolist() == ids and batch["labels"][b, :len(ids)].tolist() == labels
        assert (batch["labels"][b, len(ids):] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].sum() == len(ids)
    assert batch["protein"].lengths.tolist() == [10, 10]  # the training crop
