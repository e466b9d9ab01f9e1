"""What a patch declares, and the list of patches sgl-accel ships.

Every module in patches/ that defines ``PATCH`` is a patch (found, not
listed by hand); report order is the modules' name order. Patch modules import
nothing heavy at module level (no torch, no sglang). Anything that needs torch is
built by ``Patch.helpers`` when the patch is actually applied.

Start-up does not import this module: it reads ``_index.py``, generated from here
(``python -m sgl_accel._registry``; a test checks that it is in sync).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

HARDWARE_KINDS = ("ascend", "rocm", "cuda", "cpu")
PATCH_KINDS = ("perf", "fix", "feature")

def patch_modules() -> list[str]:
    """The modules of patches/ (one per upstream change), in name order."""
    import pkgutil

    from . import patches

    return sorted(m.name for m in pkgutil.iter_modules(patches.__path__) if not m.name.startswith("_"))


@dataclass(frozen=True)
class Target:
    """One function to rewrite: ``module`` + ``qualname`` (``Class.method`` or ``function``).

    ``rules`` must each match their exact count of sites (``moved``: see below). ``upstream`` are
    patterns (or Present/Probe/Custom objects) that only the already-changed
    upstream code contains; any match means the release has the change and the
    target is left alone.
    """

    module: str
    qualname: str
    rules: Sequence = ()
    upstream: Sequence[str] = ()
    # Other (module, qualname) places later releases keep this function (e.g. NSA renamed
    # DSA in 0.5.13), newest first; the first of them whose source defines it is the target
    # there, and the own place only when none does (a later release may keep an older copy
    # of the function at the old place while the live code moved on).
    moved: Sequence = ()
    # (marker, why): the release replaced this code with something that does the same job
    # better (e.g. another kernel); the target is left alone and reported "replaced".
    replaced: Sequence = ()
    # (marker, why), checked when the rules do not match: the function exists in an older
    # form the patch was not written for; reported "older-form" instead of "drifted".
    older: Sequence = ()

    @property
    def key(self) -> str:
        return f"{self.module}:{self.qualname}"


@dataclass(frozen=True)
class Part:
    """A group of targets applied together, with its own hardware gate.

    Most patches have one part. A patch whose pieces serve different hardware
    (e.g. compile on ROCm only, copy removal on CUDA and ROCm) has several; each
    part is atomic, and the report says which parts applied and why others did not.
    """

    name: str
    targets: Sequence[Target]
    hardware: Sequence[str] = ()  # empty = the patch's hardware


@dataclass(frozen=True)
class Patch:
    name: str
    upstream_pr: str
    kind: str
    summary: str
    hardware: Sequence[str]
    parts: Sequence[Part]
    # "module.path:symbol" strings that must import on this machine.
    kernels: Sequence[str] = ()
    # A PEP 440 specifier; dev and local builds are compared as their release.
    releases: str = ""
    # Optional feature gate over the release's source: fn(reader: _guard.SourceReader)
    # -> None if fine, else the reason it does not apply. Source-based so that the
    # scanner (no import) and apply() decide the same way.
    gate: Optional[Callable] = None
    # Modules the gate reads besides the targets (the scanner extracts them).
    gate_modules: Sequence[str] = ()
    # Called once when the patch is applied: returns {name: object} the rewritten
    # code refers to (bound as closure variables, never added to sglang modules).
    helpers: Optional[Callable[[], dict]] = None
    # Hardware detail gate: fn(hardware_info) -> None or reason (e.g. gfx95 only).
    hardware_check: Optional[Callable] = None
    # Opt-in patches (not checked on real hardware and changing scheduling) are applied
    # only when named: SGL_ACCEL=name, apply([name]); SGL_ACCEL=1 and apply() skip them.
    opt_in: bool = False

    def __post_init__(self):
        if self.kind not in PATCH_KINDS:
            raise ValueError(f"patch {self.name}: kind must be one of {PATCH_KINDS}")
        for hw in self.hardware:
            if hw not in HARDWARE_KINDS:
                raise ValueError(f"patch {self.name}: unknown hardware {hw!r}")

    @property
    def targets(self) -> list[Target]:
        return [t for part in self.parts for t in part.targets]



_extra: dict[str, Patch] = {}
_module_of: dict[str, str] = {}
_cache: Optional[dict[str, Patch]] = None


def all_patches() -> dict[str, Patch]:
    """name -> Patch, the shipped patches followed by any registered for tests."""
    global _cache
    if _cache is None:
        found = {}
        for module_name in patch_modules():
            module = importlib.import_module(f"sgl_accel.patches.{module_name}")
            patch = getattr(module, "PATCH", None)
            if patch is None:
                continue
            found[patch.name] = patch
            _module_of[patch.name] = module_name
        _cache = found
    return {**_cache, **_extra}


def register_extra(patch: Patch) -> None:
    """Register an additional patch (used by the test suite for a test-only patch)."""
    _extra[patch.name] = patch


def unregister_extra(name: str) -> None:
    _extra.pop(name, None)


class NotNeeded(str):
    """A feature gate's reason meaning the release's own code is correct: the fix targets a
    state this release never had (the compatibility matrix reports it "not-needed")."""


class UnknownPatchError(ValueError):
    pass


def resolve_names(names) -> list[str]:
    """Validate patch names; None means all. Raises UnknownPatchError listing valid names."""
    known = all_patches()
    if names is None:
        return list(known)
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnknownPatchError(
            f"unknown sgl-accel patch name(s): {', '.join(unknown)}; valid names: {', '.join(known)}"
        )
    return list(dict.fromkeys(names))


def default_names() -> list[str]:
    """The patches "all" means (SGL_ACCEL=1, apply() with no names): every patch but the opt-in ones."""
    return [name for name, patch in all_patches().items() if not patch.opt_in]


def cases_module(name: str) -> str | None:
    """The module of equivalence cases of a shipped patch (sgl_accel.cases.<module>)."""
    all_patches()
    module = _module_of.get(name)
    return f"sgl_accel.cases.{module}" if module else None


def patch_module_file(patch: Patch) -> Optional[str]:
    """The file of a shipped patch's module (None for a patch registered at run time)."""
    import sys

    module = _module_of.get(patch.name)
    if module is None or all_patches().get(patch.name) is not patch:
        return None
    return getattr(sys.modules.get(f"sgl_accel.patches.{module}"), "__file__", None)


def import_places(patch: Patch) -> list[str]:
    """Every module whose import may bring a target of ``patch`` (its own places and moved ones)."""
    return sorted({t.module for t in patch.targets} | {m for t in patch.targets for m, _ in t.moved})


def index_source() -> str:
    """The text of _index.py: what start-up needs to know without importing the registry."""
    lines = [
        '"""Generated by ``python -m sgl_accel._registry`` from the patch modules; do not edit.',
        "",
        "Start-up reads it instead of the registry (which imports dataclasses and every patch",
        'module): name -> (opt_in, modules whose import brings a target)."""',
        "",
        "PATCHES = {",
    ]
    for name, patch in _shipped().items():
        lines.append(f"    {name!r}: ({patch.opt_in!r}, {tuple(import_places(patch))!r}),")
    return "\n".join(lines + ["}", ""])


def _shipped() -> dict[str, Patch]:
    all_patches()
    return dict(_cache or {})


TABLE_START = "<!-- patch-table:start (generated by python -m sgl_accel._registry; do not edit) -->"
TABLE_END = "<!-- patch-table:end -->"
_HARDWARE_NAMES = {"ascend": "Ascend", "rocm": "ROCm", "cuda": "CUDA", "cpu": "CPU"}


def patch_table() -> str:
    """The README's table of shipped patches, from the registry (like the matrix table)."""
    lines = ["| patch | kind | upstream | hardware | what it changes |", "| --- | --- | --- | --- | --- |"]
    for name, patch in _shipped().items():
        hardware = ", ".join(_HARDWARE_NAMES[h] for h in patch.hardware)
        kind = patch.kind + (" (opt-in)" if patch.opt_in else "")
        summary = " ".join(patch.summary.split())
        lines.append(f"| `{name}` | {kind} | {patch.upstream_pr} | {hardware} | {summary} |")
    return "\n".join(lines)


def readme_patch_table(text: str) -> str:
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip("\n")


def write_generated(readme="README.md") -> None:
    """Regenerate _index.py and the README's patch table."""
    from pathlib import Path

    Path(__file__).with_name("_index.py").write_text(index_source())
    path = Path(readme)
    text = path.read_text()
    head, rest = text.split(TABLE_START, 1)
    path.write_text(f"{head}{TABLE_START}\n{patch_table()}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}")


if __name__ == "__main__":
    write_generated()
    print("wrote sgl_accel/_index.py and the README patch table")
