"""One base class for sepit's own errors: every exception class sepit defines is a ``SepitError``,
and a command turns one into a one-line message and its exit code."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import sepit
from sepit.errors import SepitError


def _sepit_modules():
    for info in pkgutil.walk_packages(sepit.__path__, prefix="sepit."):
        yield importlib.import_module(info.name)


def test_every_exception_class_in_sepit_is_a_sepit_error():
    found, stray = [], []
    for module in _sepit_modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found.append(f"{module.__name__}.{name}")
                if not issubclass(obj, SepitError):
                    stray.append(f"{module.__name__}.{name}")
    assert len(found) > 40, found  # the walk reached the whole package
    assert not stray, f"exception classes not derived from sepit.errors.SepitError: {stray}"


def test_error_classes_keep_their_builtin_base():
    from sepit.config.base import ConfigError
    from sepit.storage import StorageError
    from sepit.train.launch import TrainingError

    assert issubclass(ConfigError, ValueError) and issubclass(TrainingError, RuntimeError)
    assert issubclass(StorageError, FileNotFoundError) and issubclass(StorageError, ValueError)


def test_a_command_prints_a_sepit_error_in_one_line_with_exit_code_2(tmp_path, capsys):
    from sepit.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["score", "--predictions", str(bad), "--out", str(tmp_path / "o"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sepit score: ") and err.count("\n") == 1 and "not valid JSON" in err
    assert main(["score", "--predictions", str(tmp_path / "o" / "x.jsonl"), "--out", str(tmp_path / "o"),
                 "generation.nope=1"]) == 2
    assert capsys.readouterr().err.startswith("sepit score: ")


def test_a_bug_is_not_swallowed_by_the_command_handler(tmp_path, monkeypatch):
    from sepit.cli import main
    from sepit.evaluation import score_predictions as score

    def broken(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(score, "score_file", broken)
    with pytest.raises(KeyError):
        main(["score", "--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), "--no-mlflow"])
