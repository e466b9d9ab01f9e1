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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from packaging.version import Version

from .._registry import all_patches
from .._report import PatchReport, Report
from . import BENEFIT_STATES, load_matrix


class NotInMatrix(LookupError):
    pass


def plan_release(version: str, hardware) -> Report:
    """What apply() would do on a release of the matrix, on ``hardware``, without installing it."""
    from .. import __version__

    matrix = load_matrix()
    row = matrix["matrix"].get(version)
    if row is None:
        raise NotInMatrix(f"sglang {version} is not in the compatibility matrix; known releases: {', '.join(matrix['releases'])}")
    reports = []
    for name, patch in all_patches().items():
        entry = row.get(name)
        if entry is None:
            reports.append(PatchReport(name, "skipped", "not scanned yet: run make compat", patch.kind, patch.upstream_pr))
            continue
        state, reason = _plan_state(patch, entry, hardware)
        reports.append(PatchReport(name, state, reason, patch.kind, patch.upstream_pr, dict(entry["parts"])))
    return Report(reports, sglang=f"sglang {version} (from the matrix)", hardware=hardware.describe(), version=__version__)


# How apply() reports each matrix state (the loader's report states), the matrix state
# itself leading the reason so that the named state is never lost.
_REPORTED_AS = {
    "upstream": "upstream",
    "replaced": "skipped",
    "not-needed": "not-applicable",
    "older-form": "not-applicable",
    "not-applicable": "not-applicable",
    "absent": "not-applicable",
    "drifted": "skipped",
}


def _plan_state(patch, entry: dict, hardware) -> tuple[str, str]:
    usable = [p for p in patch.parts if hardware.kind in (tuple(p.hardware) or tuple(patch.hardware))]
    if not usable:
        return "not-applicable", f"needs {'/'.join(sorted({h for p in patch.parts for h in (p.hardware or patch.hardware)}))}, found {hardware.describe()}"
    if patch.hardware_check is not None:
        reason = patch.hardware_check(hardware)
        if reason:
            return "not-applicable", reason
    state = entry["state"]
    if state == "applies":
        needs = f"; needs {', '.join(patch.kernels)}" if patch.kernels else ""
        opt_in = " when named (opt-in)" if patch.opt_in else ""
        return "applies", f"parts {', '.join(p.name for p in usable)} apply{opt_in}{needs}: {entry['reason']}"
    return _REPORTED_AS.get(state, "skipped"), f"{state}: {entry['reason']}"


@dataclass
class Pin:
    requirement: str  # "" when no release gives every benefit
    releases: list  # the releases that do
    names: list  # the patches counted
    explanation: list  # (release, gives every benefit, [(patch, state, reason)])


def pin(names: Optional[list], hardware_kind: Optional[str] = None) -> Pin:
    """The releases on which every named patch (default: every non-opt-in patch for the
    hardware) gives its benefit, as a pip requirement, with the per-release reasons."""
    matrix = load_matrix()
    patches = all_patches()
    if not names:
        names = [
            n
            for n, p in patches.items()
            if not p.opt_in and (hardware_kind is None or any(hardware_kind in (part.hardware or p.hardware) for part in p.parts))
        ]
    explanation = []
    for release in matrix["releases"]:
        row = matrix["matrix"][release]
        cells = [(n, row.get(n, {}).get("state", "not scanned"), row.get(n, {}).get("reason", "run make compat")) for n in names]
        explanation.append((release, all(state in BENEFIT_STATES for _, state, _ in cells), cells))
    good = [Version(r) for r, ok, _ in explanation if ok]
    if not good:
        return Pin("", [], names, explanation)
    low, high = good[0], good[-1]
    excluded = [Version(r) for r, ok, _ in explanation if not ok and low <= Version(r) <= high]
    spec = [f">={low}", f"<={high}"] + [f"!={v}" for v in excluded]
    return Pin("sglang" + ",".join(spec), [str(v) for v in good], names, explanation)


def explain(result: Pin) -> str:
    """Per release: whether it gives every benefit, then per patch its state and reason."""
    lines = [f"benefit of {', '.join(result.names)} per sglang release (yes = every one present):"]
    for release, ok, cells in result.explanation:
        lines.append(f"{release}: {'yes' if ok else 'no'}")
        for name, state, reason in cells:
            lines.append(f"    {name}: {state}: {reason}")
    return "\n".join(lines)
