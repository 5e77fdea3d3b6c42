""""One place" modules stay the one place: only ``sepit/tracking`` imports MLflow, and only
``sepit/ray_runtime.py`` starts Ray or names a ``RAY_*`` environment variable (read with ``ast``,
imports inside functions included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SEPIT = Path(__file__).resolve().parent.parent / "sepit"
_RAY_ENV = re.compile(r"RAY_[A-Z_]+")


def _modules():
    for path in sorted(SEPIT.rglob("*.py")):
        yield path.relative_to(SEPIT.parent).as_posix(), ast.parse(path.read_text(), str(path))


def test_only_sepit_tracking_imports_mlflow():
    found = []
    for name, tree in _modules():
        if name.startswith("sepit/tracking/"):
            continue
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{name}:{node.lineno}" for m in mods if m == "mlflow" or m.startswith("mlflow.")]
    assert not found, f"import mlflow outside sepit/tracking (add a function there instead): {found}"


def test_only_ray_runtime_starts_ray_or_names_ray_environment_variables():
    calls, env = [], []
    for name, tree in _modules():
        if name == "sepit/ray_runtime.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray":
                calls.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _RAY_ENV.fullmatch(node.value):
                env.append(f"{name}:{node.lineno} {node.value}")
    assert not calls, f"ray.init outside sepit/ray_runtime.py (use init_ray): {calls}"
    assert not env, f"Ray environment variables outside sepit/ray_runtime.py: {env}"
