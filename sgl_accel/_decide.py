"""The one decision: for a patch and a context, the state of every part and every target, with reasons.

``apply()`` (live functions), ``status``/``plan``/``diff`` (the installed source), the
compatibility scanner (an unpacked release wheel) and ``plan --sglang``/``pin`` (rows of
the matrix) all call ``decide``; they differ only in the ``Context`` they pass: how a
target's source is read and which gates can be judged there. ``decide`` changes nothing.

Order of the gates: sglang installed, release (unless forced), target modules imported
(live only), then per part the hardware (unless forced) and the structural guard of every
target, the tested-source policy; then per patch the feature gate and the kernels (unless
forced). A target that run-time code has wrapped refuses the whole patch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Optional

from ._guard import check_def, module_file, resolved_parts


class _Vocabulary(str, enum.Enum):
    """A closed vocabulary whose members compare, hash and print as their text."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:
        return str.__hash__(self)

    def __repr__(self) -> str:  # prints in lists and dicts as the plain text it compares equal to
        return repr(self.value)


class State(_Vocabulary):
    """Of a patch or a part."""

    APPLIES = "applies"  # a plan: apply() would rewrite it
    APPLIED = "applied"
    PENDING_IMPORT = "pending-import"
    UPSTREAM = "upstream"
    NOT_APPLICABLE = "not-applicable"
    SKIPPED = "skipped"
    FAILED = "failed"


class TargetState(_Vocabulary):
    """Of one target. More may be added (e.g. by the compatibility scanner); callers match members."""

    APPLIES = "applies"  # has the shape the patch was written for
    UPSTREAM = "upstream"  # already has the change
    DRIFTED = "drifted"  # exists with another shape (or memory differs from the file)
    ABSENT = "absent"  # not in this sglang
    WRAPPED = "wrapped"  # run-time code wrapped or replaced it: never unwrapped
    PENDING_IMPORT = "pending-import"  # its module is not imported yet
    NOT_CHECKED = "not-checked"  # its part is excluded by a gate
    REPLACED = "replaced"  # the release replaced it with other code doing the same job (Target.replaced)
    OLDER_FORM = "older-form"  # an older form the patch was not written for (Target.older)
    APPLIED = "applied"  # rewritten and in place
    REVERTED = "reverted"  # the original is back
    OVERWRITTEN = "overwritten"  # other code replaced our function since: left to it


@dataclass
class Source:
    """What a context's reader found for a target: the def to check, or a state already decided
    (absent, wrapped, pending, a recorded matrix verdict, a cached verdict)."""

    node: object = None
    state: Optional[TargetState] = None
    reason: str = ""
    fingerprint: Optional[str] = None
    # Run only when the target applies (costly): None if fine, else why not (memory vs file).
    confirm: Optional[Callable[[], Optional[str]]] = None
    handle: object = None  # the reader's own data, handed to the builder
    # The reader parsed ``node`` for this check alone: the rules may rewrite it in place.
    rewrite_in_place: bool = False


@dataclass
class Context:
    """Where a patch is judged. A gate whose input is None is not judged here."""

    sglang_root: Optional[str]  # None: sglang is not installed
    version: Optional[str]
    read: Callable  # read(target) -> Source
    hardware: object = None
    kernels: Optional[Callable] = None  # kernels(symbol) -> (ok, detail)
    feature: Optional[Callable] = None  # feature(patch) -> None or reason
    tested: Optional[Callable] = None  # tested(target key, fingerprint) -> bool
    missing_modules: Callable = lambda modules: []  # live: the modules not imported yet
    force: bool = False
    reader: object = None  # a _guard.SourceReader of the release, for SourceCheck markers
    # parts(patch) -> [(part, [targets as named there])]; None: moved places read from sglang_root's files
    parts: Optional[Callable] = None


@dataclass
class TargetDecision:
    target: object  # Target, as named in this sglang (moved places resolved)
    state: TargetState
    reason: str = ""
    fingerprint: Optional[str] = None
    patched: object = None  # the rewritten def (applies)
    original: object = None
    source: Optional[Source] = None


@dataclass
class PartDecision:
    name: str
    state: State
    reason: str = ""
    targets: list = field(default_factory=list)

    def text(self) -> str:
        """The part as reports and the matrix show it: "applies", "upstream", "skipped: why"."""
        return f"{self.state}: {self.reason}" if self.reason else str(self.state)


@dataclass
class Decision:
    patch: object
    state: State
    reason: str
    parts: list = field(default_factory=list)
    kernels_found: list = field(default_factory=list)
    missing: list = field(default_factory=list)  # pending: the modules to wait for

    @property
    def targets(self) -> list:
        return [t for part in self.parts for t in part.targets]

    def applicable(self) -> list:
        return [part for part in self.parts if part.state is State.APPLIES]


# --------------------------------------------------------------------------- gates


def release_reason(patch, version: Optional[str]) -> Optional[str]:
    """The release gate: None if ``version`` is inside ``patch.releases`` (or unknown).
    A dev or local build (0.5.12.post1.dev3+g1234abc) is judged as its release."""
    if not patch.releases or not version:
        return None
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        return None
    post = f".post{parsed.post}" if parsed.post is not None else ""
    if SpecifierSet(patch.releases).contains(Version(parsed.base_version + post), prereleases=True):
        return None
    return f"sglang {version} is outside {patch.releases}"


def hardware_reason(patch, part, hardware) -> Optional[str]:
    allowed = tuple(part.hardware) or tuple(patch.hardware)
    if hardware.kind not in allowed:
        return f"needs {'/'.join(allowed)}, found {hardware.describe()}"
    return patch.hardware_check(hardware) if patch.hardware_check is not None else None


def source_feature(sglang_root: str) -> Callable:
    """The feature gate over a release's source (``Patch.gate``)."""
    from ._guard import SourceReader

    return lambda patch: patch.gate(SourceReader(sglang_root)) if patch.gate is not None else None


_resolved: dict = {}  # (id(patch), root) -> (patch, [(part, [targets])])


def parts_of(patch, sglang_root: Optional[str]) -> list:
    """[(part, [targets as named in this sglang])], memoized (moved places are read from files)."""
    key = (id(patch), sglang_root)
    cached = _resolved.get(key)
    if cached is None or cached[0] is not patch:
        cached = _resolved[key] = (patch, resolved_parts(patch, sglang_root))
    return cached[1]


def modules_of(patch, sglang_root: Optional[str]) -> list:
    """The modules of the patch's targets in this sglang."""
    return sorted({t.module for _, targets in parts_of(patch, sglang_root) for t in targets})


def _parts(patch, ctx: Context) -> list:
    return ctx.parts(patch) if ctx.parts is not None else parts_of(patch, ctx.sglang_root)


# --------------------------------------------------------------------------- the decision


def decide(patch, ctx: Context) -> Decision:
    """The state of ``patch`` and of each of its parts and targets in ``ctx``."""
    early = _before_parts(patch, ctx)
    if early is not None:
        return early
    parts = [_decide_part(patch, part, targets, ctx) for part, targets in _parts(patch, ctx)]
    wrapped = [t for t in (t for p in parts for t in p.targets) if t.state is TargetState.WRAPPED]
    if wrapped:  # all or nothing per patch: another library's wrapper is never bypassed
        for part in parts:
            if part.state is State.APPLIES:
                part.state, part.reason = State.SKIPPED, "another part's target is wrapped"
        return Decision(patch, State.SKIPPED, "; ".join(t.reason for t in wrapped), parts)
    if not any(part.state is State.APPLIES for part in parts):
        return Decision(patch, *_fold(parts, ctx.version), parts)
    return _after_parts(patch, parts, ctx)


def _before_parts(patch, ctx: Context) -> Optional[Decision]:
    if ctx.sglang_root is None:
        return Decision(patch, State.NOT_APPLICABLE, "sglang is not installed")
    reason = None if ctx.force else release_reason(patch, ctx.version)
    if reason:
        return Decision(patch, State.NOT_APPLICABLE, reason)
    missing = ctx.missing_modules(sorted({t.module for _, targets in _parts(patch, ctx) for t in targets}))
    if not missing:
        return None
    # A module this sglang does not have will never be imported: say so now.
    absent = [m for m in missing if m.startswith("sglang.") and module_file(m, ctx.sglang_root) is None]
    if absent:
        return Decision(patch, State.NOT_APPLICABLE, f"sglang {ctx.version} has no {', '.join(absent)}")
    # Hardware, kernels and the guard wait for the import (by then torch is loaded anyway).
    return Decision(patch, State.PENDING_IMPORT, f"waits for sglang to import {', '.join(missing)}", missing=missing)


def _decide_part(patch, part, targets, ctx: Context) -> PartDecision:
    if not ctx.force and ctx.hardware is not None:
        reason = hardware_reason(patch, part, ctx.hardware)
        if reason:
            return PartDecision(part.name, State.NOT_APPLICABLE, reason, [TargetDecision(t, TargetState.NOT_CHECKED, reason) for t in targets])
    checked = [check_target(t, ctx.read(t), ctx.reader) for t in targets]
    states = {t.state for t in checked}
    if states == {TargetState.UPSTREAM}:
        return PartDecision(part.name, State.UPSTREAM, "", checked)
    if states != {TargetState.APPLIES}:
        prefix = "partly upstream, " if TargetState.UPSTREAM in states else ""
        return PartDecision(part.name, State.SKIPPED, prefix + "; ".join(t.reason for t in checked if t.state is not TargetState.APPLIES), checked)
    untested = [f"{t.target.qualname} fingerprint {t.fingerprint}" for t in checked if ctx.tested and not ctx.tested(t.target.key, t.fingerprint)]
    if untested:
        reason = "untested source (" + ", ".join(untested) + "); set SGL_ACCEL_ALLOW_UNTESTED=1 to apply anyway"
        return PartDecision(part.name, State.SKIPPED, reason, checked)
    return PartDecision(part.name, State.APPLIES, "", checked)


def check_target(target, source: Source, reader=None) -> TargetDecision:
    """The structural guard on what the reader found (a decided source is taken as is)."""
    if source.state is not None:
        return TargetDecision(target, source.state, source.reason, source.fingerprint, source=source)
    verdict = check_def(target, source.node, reader, in_place=source.rewrite_in_place)
    state = TargetState(verdict.state)
    reason = verdict.reason
    if state is TargetState.APPLIES and source.confirm is not None:
        problem = source.confirm()
        if problem:
            state, reason = TargetState.DRIFTED, problem
    return TargetDecision(target, state, reason, verdict.fingerprint, verdict.patched, verdict.original, source)


def _after_parts(patch, parts: list, ctx: Context) -> Decision:
    """Patch-level gates of a patch with an applicable part: the feature gate, then kernels."""
    reason = None if ctx.force or ctx.feature is None else ctx.feature(patch)
    found: list = []
    if reason is None and not ctx.force and ctx.kernels is not None:
        for symbol in patch.kernels:
            ok, detail = ctx.kernels(symbol)
            if not ok:
                reason = detail
                break
            found.append(detail)
    if reason:
        return Decision(patch, State.NOT_APPLICABLE, reason, parts)
    return Decision(patch, State.APPLIES, "; ".join(f"{p.name}: {p.text()}" for p in parts), parts, found)


def _fold(parts: list, version) -> tuple:
    """(state, reason) of a patch none of whose parts applies."""
    states = [p.state for p in parts]
    # One part, or every part excluded for the same reason (e.g. the hardware): that reason once.
    single = len({(p.state, p.reason) for p in parts}) == 1
    text = parts[0].reason or str(parts[0].state) if single else "; ".join(f"{p.name}: {p.text()}" for p in parts)
    if states and all(s is State.UPSTREAM for s in states):
        return State.UPSTREAM, f"sglang {version} already contains the change"
    if State.SKIPPED in states:
        return State.SKIPPED, text
    if State.UPSTREAM in states:
        return State.UPSTREAM, text
    return State.NOT_APPLICABLE, text
