"""Answers from the matrix: ``sgl-accel plan --sglang X`` and ``sgl-accel pin``.

The question ``pin`` answers: on which sglang releases does the user get the benefit of each
named patch (by default every patch for the hardware, opt-in patches only when named)? A
release gives a patch's benefit when the matrix cell is one of ``BENEFIT_STATES``:

* ``applies``: sgl-accel applies the patch there;
* ``upstream``: the release already has the change, in the patch's own place or where a later
  release moved it;
* ``replaced``: the release replaced the target with other code doing the same job;
* ``not-needed``: the release's own code is correct, because the fix targets a state that
  release never had.

Every other state (outside the patch's range, code absent, an older or another shape) means
the user does not get the benefit on that release.

Both answer through ``_decide.decide``, the decision apply() and ``status`` make, with the
matrix row as its context (``matrix_context``): the gates are written once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from packaging.version import Version

from .._decide import Context, Decision, Source, State, TargetState, decide, hardware_reason
from .._registry import all_patches
from .._report import PatchReport, Report
from . import BENEFIT_STATES, load_matrix


class NotInMatrix(LookupError):
    pass


def matrix_context(release: str, entry: dict, hardware) -> Context:
    """A release of the matrix as the context of ``decide``: the scanner's verdict on each target
    is its source; the release and hardware gates are judged as apply() judges them; the feature
    gate's verdict is the cell's; kernels cannot be judged without the machine."""
    recorded = entry["targets"]

    def read(target) -> Source:
        seen = recorded.get(target.key)
        if seen is None:
            return Source(state=TargetState.NOT_CHECKED, reason=f"{target.key} is not in the matrix: run make compat")
        return Source(state=TargetState(seen["state"]), reason=f"{seen['file']}: {seen['reason']}", fingerprint=seen["fingerprint"])

    def feature(patch) -> Optional[str]:
        # Reached only inside the release range with every target applying: a cell that is
        # still not-applicable or not-needed was decided by the feature gate.
        return f"{entry['state']}: {entry['reason']}" if entry["state"] in ("not-applicable", "not-needed") else None

    return Context(
        sglang_root=f"sglang {release} (from the matrix)",
        version=release,
        read=read,
        hardware=hardware,
        feature=feature,
        parts=lambda patch: [(part, [_as_scanned(t, recorded) for t in part.targets]) for part in patch.parts],
    )


def _as_scanned(target, recorded: dict):
    """The target as the scanner named it in that release: the first moved place it recorded."""
    for module, qualname in target.moved:
        if f"{module}:{qualname}" in recorded:
            return dataclasses.replace(target, module=module, qualname=qualname, moved=())
    return target


def decide_release(patch, release: str, hardware) -> Decision:
    """``decide`` for ``patch`` on a release of the matrix (NotInMatrix when it is not there)."""
    matrix = load_matrix()
    row = matrix["matrix"].get(release)
    if row is None:
        raise NotInMatrix(f"sglang {release} is not in the compatibility matrix; known releases: {', '.join(matrix['releases'])}")
    return decide(patch, matrix_context(release, row[patch.name], hardware))


def plan_release(version: str, hardware) -> Report:
    """What apply() would do on a release of the matrix, on ``hardware``, without installing it."""
    from .. import __version__

    row = load_matrix()["matrix"].get(version)
    reports = []
    for name, patch in all_patches().items():
        if row is not None and name not in row:
            reports.append(PatchReport(name, "skipped", "not scanned yet: run make compat", patch.kind, patch.upstream_pr, opt_in=patch.opt_in))
            continue
        decision = decide_release(patch, version, hardware)
        parts = {p.name: p.text() for p in decision.parts}
        reports.append(PatchReport(name, decision.state, _plan_reason(decision, row[name]), patch.kind, patch.upstream_pr, parts, opt_in=patch.opt_in))
    return Report(reports, sglang=f"sglang {version} (from the matrix)", hardware=hardware.describe(), version=__version__)


def _plan_reason(decision: Decision, entry: dict) -> str:
    """The decision in the matrix's words: which parts apply (and what the others are), else the
    cell's state and reason; a reason of this machine (the hardware) as decide gives it."""
    patch = decision.patch
    if decision.state is State.APPLIES:
        applying = [p.name for p in decision.applicable()]
        others = [f"{p.name}: {p.text()}" for p in decision.parts if p.state is not State.APPLIES]
        verb = "applies" if len(applying) == 1 else "apply"
        besides = f" ({'; '.join(others)})" if others else ""
        opt_in = " when named (opt-in)" if patch.opt_in else ""
        needs = f"; needs {', '.join(patch.kernels)}" if patch.kernels else ""
        return f"part{'s' * (len(applying) > 1)} {', '.join(applying)} {verb}{besides}{opt_in}{needs}: {entry['reason']}"
    if _hardware_excluded(decision):
        return decision.reason
    return f"{entry['state']}: {entry['reason']}"


def _hardware_excluded(decision: Decision) -> bool:
    """Every part left out by the hardware gate (in a matrix context, the only part-level not-applicable)."""
    return bool(decision.parts) and all(p.state is State.NOT_APPLICABLE for p in decision.parts)


def benefit_state(decision: Decision, entry: dict) -> tuple[str, str]:
    """(matrix state, reason) of a cell on the decision's hardware: where decide is definite
    (applies, upstream, left out by the hardware) its word, else the scanner's finer one."""
    if decision.state is State.APPLIES:
        whole = entry["state"] == "applies" and len(decision.applicable()) == len(decision.parts)
        return "applies", entry["reason"] if whole else _plan_reason(decision, entry)
    if _hardware_excluded(decision):
        return "not-applicable", decision.reason
    if decision.state is State.UPSTREAM and entry["state"] != "upstream":
        return "upstream", decision.reason
    return entry["state"], entry["reason"]


@dataclass
class Pin:
    requirement: str  # "" when no release gives every benefit
    releases: list  # the releases that do
    names: list  # the patches counted
    explanation: list  # (release, gives every benefit, [(patch, state, reason)])


def pin(names: Optional[list], hardware=None) -> Pin:
    """The releases on which every named patch (default: every non-opt-in patch for the
    hardware) gives its benefit, as a pip requirement, with the per-release reasons.
    ``hardware`` (a _detect.Hardware) None: every hardware counts."""
    matrix = load_matrix()
    patches = all_patches()
    if not names:
        names = [n for n, p in patches.items() if not p.opt_in and (hardware is None or any(hardware_reason(p, part, hardware) is None for part in p.parts))]
    explanation = []
    for release in matrix["releases"]:
        cells = [(n, *_benefit_cell(patches.get(n), release, matrix["matrix"][release].get(n), hardware)) for n in names]
        explanation.append((release, all(state in BENEFIT_STATES for _, state, _ in cells), cells))
    good = [Version(r) for r, ok, _ in explanation if ok]
    if not good:
        return Pin("", [], names, explanation)
    low, high = good[0], good[-1]
    excluded = [Version(r) for r, ok, _ in explanation if not ok and low <= Version(r) <= high]
    spec = [f">={low}", f"<={high}"] + [f"!={v}" for v in excluded]
    return Pin("sglang" + ",".join(spec), [str(v) for v in good], names, explanation)


def _benefit_cell(patch, release: str, entry: Optional[dict], hardware) -> tuple[str, str]:
    if patch is None or entry is None:
        return "not scanned", "run make compat"
    return benefit_state(decide(patch, matrix_context(release, entry, hardware)), entry)


def explain(result: Pin) -> str:
    """Per release: whether it gives every benefit, then per patch its state and reason."""
    lines = [f"benefit of {', '.join(result.names)} per sglang release (yes = every one present):"]
    for release, ok, cells in result.explanation:
        lines.append(f"{release}: {'yes' if ok else 'no'}")
        for name, state, reason in cells:
            lines.append(f"    {name}: {state}: {reason}")
    return "\n".join(lines)
