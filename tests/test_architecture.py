"""The layering of docs/architecture.md, checked on the source: each medssl sub-package imports only the ones below
it (utils none), and function-local medssl imports only for a documented cycle (none now)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "common" / "medssl"
# bottom to top; a sub-package may import a lower one or itself ("" = the medssl package root: __version__)
LAYERS = ["utils", "text", "data", "transforms", "networks", "losses", "methods", "engines", "weights", "evaluation",
          "downstream", "detection"]
SIDE = {"cli": 0, "bundle": 0, "": 0}  # beside utils at the bottom
# (module file, imported module) pairs allowed inside functions, for a documented cycle: none now (data/demo/builder.py
# imports data/learnability.py at its top; learnability imports only the demo's generators and writers)
LOCAL_ALLOWED: set[tuple[str, str]] = set()


def _rank(package: str) -> int:
    return SIDE[package] if package in SIDE else LAYERS.index(package)


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(absolute medssl module, inside a function?, line) of every medssl import in ``path``."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package_parts = module.split(".")[:-1]  # the package a relative import starts from (also for __init__.py)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local_lines = {
        sub.lineno
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for sub in ast.walk(node)
        if isinstance(sub, (ast.Import, ast.ImportFrom))
    }
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                names = [".".join(base + ([node.module] if node.module else []))]
            elif node.module:
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name == "medssl" or name.startswith("medssl."):
                found.append((name, node.lineno in local_lines, node.lineno))
    return found


def _sub_package(path_or_module: str) -> str:
    parts = path_or_module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _files():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield path, rel.as_posix(), rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def test_sub_packages_import_only_the_layers_below():
    wrong = []
    for path, rel, own in _files():
        own = "" if own == "__init__" else own
        for name, _, line in _imports(path):
            target = _sub_package(name)
            if target == own or target == "":
                continue
            if own == "utils" or _rank(target) >= _rank(own):
                wrong.append(f"{rel}:{line} imports {name} ({own or 'medssl'} may not import {target})")
    assert not wrong, "\n".join(wrong)


def test_function_local_medssl_imports_only_for_the_documented_cycle():
    local = [
        f"{rel}:{line} imports {name} inside a function"
        for path, rel, _ in _files()
        for name, inside, line in _imports(path)
        if inside and (rel, name) not in LOCAL_ALLOWED
    ]
    assert not local, "\n".join(local)
