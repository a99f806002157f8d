"""The relay's public surface: every module in relay/ says what it offers in `__all__`, and nothing
reaches past that, neither a `_private` name of a relay module nor a `_private` attribute of a relay
object from outside its class, anywhere in the repository's Python code (read as source, not run).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / "relay"
SCANNED = [ROOT / "function_app.py", *(ROOT / folder for folder in ("relay", "devstack", "benchmarks", "tests"))]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


RELAY_MODULES = {_module_name(path): path for path in sorted(RELAY.rglob("*.py"))}


def _python_files() -> Iterator[Path]:
    for place in SCANNED:
        yield from sorted(place.rglob("*.py")) if place.is_dir() else [place]


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@cache
def _exported(module: str) -> tuple[str, ...]:
    """`__all__` as the module's source writes it (a literal list of names), empty when there is none."""
    for node in _tree(RELAY_MODULES[module]).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return ()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class Reach:
    """One place where code uses a name of a relay module."""

    where: str
    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.where}: {self.module}.{self.name}"


def _reaches(path: Path) -> Iterator[Reach]:
    """Every name of a relay module this file imports or reads as `module.name`."""
    tree = _tree(path)
    where = str(path.relative_to(ROOT))
    here = _module_name(path)
    aliases: dict[str, str] = {}  # a local name bound to a relay module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in RELAY_MODULES:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in RELAY_MODULES:
                    aliases[alias.asname or alias.name] = submodule
                elif node.module != here:
                    yield Reach(f"{where}:{node.lineno}", node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in RELAY_MODULES and alias.asname:
                    aliases[alias.asname] = alias.name  # import relay.x as y
                elif alias.name in RELAY_MODULES:
                    aliases["relay"] = "relay"  # import relay.x binds `relay`
    parents = _parents(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(parents.get(node), ast.Attribute):
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if not (isinstance(base, ast.Name) and base.id in aliases):
                continue
            module = aliases[base.id]
            for attribute in reversed(chain):
                if f"{module}.{attribute}" in RELAY_MODULES:
                    module = f"{module}.{attribute}"
                    continue
                if module != here:
                    yield Reach(f"{where}:{node.lineno}", module, attribute)
                break


@cache
def _parents(tree: ast.Module) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


@cache
def _relay_private_attributes() -> frozenset[str]:
    """The `_private` attributes relay's classes give their objects (`self._x = ...`, `def _x(self)`)."""
    names = set()
    for path in RELAY_MODULES.values():
        for cls in (n for n in ast.walk(_tree(path)) if isinstance(n, ast.ClassDef)):
            names |= _own_private_attributes(cls)
    return frozenset(names)


def _own_private_attributes(cls: ast.ClassDef) -> set[str]:
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and _is_private(n.name)}
    names |= {t.id for n in cls.body if isinstance(n, ast.Assign | ast.AnnAssign)
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
              if isinstance(t, ast.Name) and _is_private(t.id)}
    for node in ast.walk(cls):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id == "self"):
            names.add(node.attr)
    return names


def _private_attribute_reads(path: Path) -> Iterator[str]:
    """`something._x` where `_x` is a private attribute of a relay object, read neither by the object
    itself (`self._x`, `cls._x`, `super()._x`) nor by the class that defines `_x` (on another instance)."""
    tree = _tree(path)
    parents = _parents(tree)
    private = _relay_private_attributes()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in private) or _is_itself(node.value):
            continue  # an object's (or its subclass's) own code on itself
        owner: ast.AST | None = node
        while owner is not None and not isinstance(owner, ast.ClassDef):
            owner = parents.get(owner)
        if isinstance(owner, ast.ClassDef) and node.attr in _own_private_attributes(owner):
            continue  # the class's own code on another instance of it
        yield f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"


def _is_itself(value: ast.expr) -> bool:
    """`self`, `cls` or `super()`."""
    if isinstance(value, ast.Call):
        return isinstance(value.func, ast.Name) and value.func.id == "super"
    return isinstance(value, ast.Name) and value.id in ("self", "cls")


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("module", RELAY_MODULES)
def test_every_relay_module_lists_its_public_names_and_each_one_exists(module):
    exported = _exported(module)
    assert exported, f"{module} has no __all__ (a literal list of names, under its imports)"
    assert len(set(exported)) == len(exported), f"{module}.__all__ names something twice"
    assert not [name for name in exported if _is_private(name)], f"{module}.__all__ exports a _private name"
    imported = importlib.import_module(module)
    assert list(imported.__all__) == list(exported)
    assert not [name for name in exported if not hasattr(imported, name)], f"{module}.__all__ names what it lacks"


@pytest.mark.parametrize("module", RELAY_MODULES)
def test_every_public_function_and_class_a_relay_module_defines_is_exported(module):
    defined = [node.name for node in _tree(RELAY_MODULES[module]).body
               if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    unlisted = [name for name in defined if not _is_private(name) and name not in _exported(module)]
    assert not unlisted, f"{module} defines {unlisted}: export them in __all__ or name them with a leading _"


def test_code_uses_only_what_a_relay_module_exports():
    outside = [str(reach) for path in _python_files() for reach in _reaches(path)
               if reach.name not in _exported(reach.module) and not reach.name.startswith("__")]
    assert not outside, "private or unexported names of relay modules used elsewhere:\n" + "\n".join(outside)


def test_no_code_reads_a_private_attribute_of_a_relay_object_from_outside_its_class():
    reads = [read for path in _python_files() for read in _private_attribute_reads(path)]
    assert not reads, "private attributes of relay objects read from outside their class:\n" + "\n".join(reads)
