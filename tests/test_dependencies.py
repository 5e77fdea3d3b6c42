"""The declared dependencies are what the code imports: no undeclared import, no unused declaration.

``sepit/`` is read with ``ast`` (every import statement, at any depth, including those inside
functions); each top-level module is mapped to the distribution that installed it
(``importlib.metadata.packages_distributions``).  An unguarded import must be a main
dependency; an optional extra (``[lora]``) may hold only what is imported inside
``try: ... except ImportError`` (so a missing extra is a clear error, not a traceback); every main
dependency must be imported by ``sepit/``; the ``dev`` extra must cover what ``tests/`` imports.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
_REQ = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(.*)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Declared:
    main: dict[str, str]
    """normalised name -> version specifier"""
    extras: dict[str, set[str]]
    """extra -> normalised names (self-references like ``sepit[lora]`` expanded)"""


def _declared() -> Declared:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    main = {}
    for req in project["dependencies"]:
        name, _, spec = _REQ.match(req).groups()
        main[_norm(name)] = spec.strip()
    raw = {extra: [_REQ.match(r).groups() for r in reqs]
           for extra, reqs in project.get("optional-dependencies", {}).items()}

    def expand(extra: str, seen: tuple[str, ...] = ()) -> set[str]:
        out = set()
        for name, sub, _ in raw[extra]:
            if _norm(name) == _norm(project["name"]):  # sepit[lora] inside dev
                for e in (sub or "").split(","):
                    if e.strip() and e.strip() not in seen:
                        out |= expand(e.strip(), seen + (extra,))
            else:
                out.add(_norm(name))
        return out

    return Declared(main, {extra: expand(extra) for extra in raw})


@dataclass(frozen=True)
class Import:
    module: str
    """top-level module name"""
    guarded: bool
    """inside ``try`` whose handler catches ImportError/ModuleNotFoundError"""
    where: str


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = []
    if isinstance(handler.type, ast.Name):
        names = [handler.type.id]
    elif isinstance(handler.type, ast.Tuple):
        names = [e.id for e in handler.type.elts if isinstance(e, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError"} & set(names))


def _imports(path: Path, rel_to: Path) -> list[Import]:
    """Every absolute import in ``path`` (and ``pytest.importorskip("x")``, which is guarded)."""
    out: list[Import] = []
    where = str(path.relative_to(rel_to))

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Try):
            body_guarded = guarded or any(_catches_import_error(h) for h in node.handlers)
            for child in node.body:
                visit(child, body_guarded)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        if isinstance(node, ast.Import):
            out.extend(Import(a.name.split(".")[0], guarded, f"{where}:{node.lineno}") for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(Import(node.module.split(".")[0], guarded, f"{where}:{node.lineno}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append(Import(node.args[0].value.split(".")[0], True, f"{where}:{node.lineno}"))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return out


def _third_party(imports: list[Import], local: set[str]) -> list[Import]:
    return [i for i in imports if i.module not in sys.stdlib_module_names and i.module not in local
            and i.module != "__future__"]


@functools.lru_cache(maxsize=1)
def _module_owners() -> dict[str, list[str]]:
    return md.packages_distributions()  # scans every installed file list: seconds, so once


def _distributions(module: str) -> set[str]:
    dists = {_norm(d) for d in _module_owners().get(module, [])}
    assert dists, f"{module} is imported but no installed distribution provides it"
    return dists


@pytest.fixture(scope="module")
def declared() -> Declared:
    return _declared()


@pytest.fixture(scope="module")
def product_imports() -> list[Import]:
    files = sorted((ROOT / "sepit").rglob("*.py"))
    return _third_party([i for f in files for i in _imports(f, ROOT)], {"sepit"})


def test_every_product_import_is_declared(declared, product_imports):
    optional = {name for extra, names in declared.extras.items() if extra != "dev" for name in names}
    problems = []
    for imp in product_imports:
        dists = _distributions(imp.module)
        if dists & set(declared.main):
            continue
        if imp.guarded and dists & optional:
            continue
        kind = "an optional extra, but the import is not guarded by `except ImportError`" \
            if dists & optional else "not declared"
        problems.append(f"{imp.where}: import {imp.module} ({'/'.join(sorted(dists))}) is {kind}")
    assert not problems, "\n".join(problems)


def test_every_declared_dependency_is_imported(declared, product_imports):
    imported = {d for imp in product_imports for d in _distributions(imp.module)}
    unused = sorted(set(declared.main) - imported)
    assert not unused, f"main dependencies that sepit/ never imports: {unused}"
    for extra, names in declared.extras.items():
        if extra == "dev":
            continue
        guarded = {d for imp in product_imports if imp.guarded for d in _distributions(imp.module)}
        assert names <= guarded, f"[{extra}] holds {sorted(names - guarded)}, which sepit/ never imports (guarded)"


def test_dev_extra_covers_the_tests_imports(declared):
    tests = ROOT / "tests"
    local = {p.stem for p in tests.glob("*.py")}
    imports = _third_party([i for f in sorted(tests.glob("*.py")) for i in _imports(f, ROOT)], local | {"sepit"})
    covered = set(declared.main) | declared.extras.get("dev", set())
    missing = sorted({f"{i.module} ({i.where})" for i in imports if not _distributions(i.module) & covered})
    assert not missing, f"tests import modules that neither the main nor the dev dependencies declare: {missing}"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def test_floors_are_met_by_the_tested_environment_and_pinned_in_the_lock(declared):
    """Every dependency has a floor, the installed (tested) version meets it, and the CPU lock
    pins each declared distribution to exactly the installed version."""
    lock = {}
    for line in (ROOT / "requirements-cpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, _, spec = _REQ.match(line).groups()
            lock[_norm(name)] = spec.strip()
    names = dict(declared.main)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for reqs in project.get("optional-dependencies", {}).values():
        for req in reqs:
            name, _, spec = _REQ.match(req).groups()
            if _norm(name) != _norm(project["name"]):
                names[_norm(name)] = spec.strip()
    for name, spec in names.items():
        floor = re.search(r">=\s*([0-9][0-9.]*)", spec)
        assert floor, f"{name}: no version floor (>=) in pyproject.toml"
        installed = md.version(name)
        assert _version_tuple(installed) >= _version_tuple(floor.group(1)), f"{name} {installed} < floor {floor.group(1)}"
        assert name in lock, f"{name} is not pinned in requirements-cpu.txt"
        pinned = lock[name].removeprefix("==")
        assert _version_tuple(pinned) == _version_tuple(installed), f"{name}: lock pins {pinned}, tested {installed}"
