"""The structural guard: does a target still have the shape its patch was written for?

One code path for every caller: ``apply()`` feeds it the def of the live
function (read from the file its code object came from), the compatibility
scanner and ``sgl-accel plan/diff`` feed it the def read from a release's
source without importing it. Both reach ``check_def``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ._rewrite import NodeIndex, Present, Probe, clone, count_matches, fingerprint, find_def


# Target states besides applies | upstream | drifted | absent (see Target.replaced / .older).
REPLACED = "replaced"
OLDER_FORM = "older-form"


@dataclass(frozen=True)
class SourceCheck:
    """A marker that also reads other modules of the release: ``check(def_node, reader) -> int``
    (sites found). ``modules``: what it reads, so the scanner extracts them from a wheel.
    Without a reader (no source to read) it finds nothing. In ``Target.older`` it is also
    asked when the target does not exist (``def_node`` None): the older form lives elsewhere."""

    description: str
    check: object
    modules: tuple = ()


@dataclass
class Verdict:
    state: str  # applies | upstream | drifted | absent | replaced | older-form
    reason: str
    fingerprint: Optional[str] = None
    original: Optional[ast.AST] = None
    patched: Optional[ast.AST] = None


def check_def(target, def_node, reader=None, *, in_place: bool = False) -> Verdict:
    """``reader``: a SourceReader of the release, for SourceCheck markers. ``in_place``: the
    caller parsed ``def_node`` for this check alone, so the rules rewrite it rather than a copy
    (the verdict then has no ``original``)."""
    if def_node is None:
        return _absent_or_older_elsewhere(target, reader)
    fp = fingerprint(def_node)
    index = NodeIndex(def_node)
    for marker in target.upstream:
        if _marker_hits(marker, def_node, index, reader):
            return Verdict("upstream", f"{target.qualname} already has the change ({marker_text(marker)})", fp, def_node)
    for marker, why in target.replaced:
        if _marker_hits(marker, def_node, index, reader):
            return Verdict(REPLACED, f"{target.qualname}: {why}", fp, def_node)
    if index.uses_private_names():
        return Verdict("drifted", f"{target.qualname} uses class-private names", fp, def_node)
    # ``older`` markers read the def after the rules failed on it: the rules then get a copy.
    in_place = in_place and not target.older
    patched = def_node if in_place else clone(def_node)
    problems = []
    for rule in target.rules:
        sites = rule.apply(patched)
        if sites != rule.count:
            problems.append(f"'{rule.description}' matched {sites} site(s), expected {rule.count}")
    original = None if in_place else def_node
    if problems:
        for marker, why in target.older:
            if _marker_hits(marker, def_node, index, reader):
                return Verdict(OLDER_FORM, f"{target.qualname}: {why}", fp, original)
        return Verdict("drifted", f"{target.qualname}: " + "; ".join(problems), fp, original)
    return Verdict("applies", f"{target.qualname} has the expected shape", fp, original, patched)


def _absent_or_older_elsewhere(target, reader) -> Verdict:
    """A missing target is "absent", unless an ``older`` SourceCheck finds (with no def to
    read: ``check(None, reader)``) the older form of that code elsewhere in the release."""
    for marker, why in target.older:
        if isinstance(marker, SourceCheck) and reader is not None and marker.check(None, reader):
            return Verdict(OLDER_FORM, f"{target.qualname}: {why}")
    return Verdict("absent", f"{target.qualname} not found in {target.module}")


def _marker_hits(marker, def_node, index, reader=None) -> int:
    """A marker is a pattern string, a Present or Probe (they only read the def), a SourceCheck,
    or a Custom rule (run on a copy: it may change the tree)."""
    if isinstance(marker, str):
        return count_matches(def_node, marker, index)
    if isinstance(marker, Present):
        return count_matches(def_node, marker.find, index)
    if isinstance(marker, Probe):
        return marker.apply(def_node)
    if isinstance(marker, SourceCheck):
        return marker.check(def_node, reader) if reader is not None else 0
    return marker.apply(clone(def_node))


def marker_text(marker) -> str:
    """How a report names a marker: its pattern, or its description."""
    text = marker if isinstance(marker, str) else marker.description
    return " ".join(text.split())


def module_file(module: str, sglang_root: str) -> Optional[Path]:
    """Where ``sglang.x.y`` lives under an sglang package directory, without importing it."""
    parts = module.split(".")
    if parts[0] != "sglang":
        return None
    base = Path(sglang_root, *parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=64)
def _parsed(path: str, mtime_ns: int) -> ast.Module:
    return ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)


def static_def(target, sglang_root: str):
    """The target's def read from source under ``sglang_root`` (None if absent)."""
    path = module_file(target.module, sglang_root)
    if path is None:
        return None
    tree = _parsed(str(path), os.stat(path).st_mtime_ns)
    return find_def(tree, target.qualname)


def check_static(target, sglang_root: str) -> Verdict:
    return check_def(target, static_def(target, sglang_root), SourceReader(sglang_root))


class SourceReader:
    """Read-only access to a release's source for feature gates: parsed modules, classes, defs."""

    def __init__(self, sglang_root: str):
        self.sglang_root = sglang_root

    def module(self, module: str) -> Optional[ast.Module]:
        path = module_file(module, self.sglang_root)
        if path is None:
            return None
        return _parsed(str(path), os.stat(path).st_mtime_ns)

    def find(self, module: str, qualname: str):
        """The ClassDef or FunctionDef named ``qualname`` in ``module`` (None if absent)."""
        tree = self.module(module)
        if tree is None:
            return None
        scope, node = tree.body, None
        for part in qualname.split("."):
            node = next((n for n in reversed(scope) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == part), None)
            if node is None:
                return None
            scope = node.body
        return node

    def class_fields(self, module: str, name: str) -> Optional[set]:
        """Annotated field names of a (data)class, None if the class is absent."""
        node = self.find(module, name)
        if not isinstance(node, ast.ClassDef):
            return None
        return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def resolve(target, sglang_root: Optional[str]):
    """The target as it is named in this sglang: the first ``moved`` place (newest first) whose
    source defines the function, else its own place (read without importing)."""
    if not target.moved or sglang_root is None:
        return target
    for module, qualname in (*target.moved, (target.module, target.qualname)):
        if _defines(module_file(module, sglang_root), qualname):
            return dataclasses.replace(target, module=module, qualname=qualname, moved=())
    return target


def _defines(path: Optional[Path], qualname: str) -> bool:
    """Whether a module's text defines ``Class.method`` / ``function`` (a textual test: cheap,
    and enough to pick a place; the structural guard then checks the def itself)."""
    import re

    if path is None:
        return False
    text = path.read_text(encoding="utf-8")
    *classes, name = qualname.split(".")
    for cls in classes[:1]:
        if not re.search(rf"^class\s+{re.escape(cls)}\b", text, re.M):
            return False
    indent = r"\s+" if classes else ""
    return re.search(rf"^{indent}(async\s+)?def\s+{re.escape(name)}\s*\(", text, re.M) is not None


def resolved_parts(patch, sglang_root: Optional[str]) -> list:
    """[(part, [targets as named in this sglang])] for every part of ``patch``."""
    return [(part, [resolve(t, sglang_root) for t in part.targets]) for part in patch.parts]
