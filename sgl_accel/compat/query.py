"""Answers from the matrix: ``sgl-accel plan --sglang X`` and ``sgl-accel pin``."""

from __future__ import annotations

from typing import Optional

from packaging.version import Version

from .._decide import Context, Source, State, TargetState, decide, release_reason
from .._plan import plan_report
from .._registry import all_patches
from .._report import PatchReport, Report
from . import load_matrix


class NotInMatrix(LookupError):
    pass


def plan_release(version: str, hardware) -> Report:
    """What apply() would do on a release of the matrix, on ``hardware``, without installing it."""
    from .. import __version__

    row = _row(version)
    reports = []
    for name, patch in all_patches().items():
        if name not in row:
            reports.append(PatchReport(name, "skipped", "not scanned yet: run make compat", patch.kind, patch.upstream_pr))
            continue
        reports.append(plan_report(decide(patch, matrix_context(version, row[name], hardware))))
    return Report(reports, sglang=f"sglang {version} (from the matrix)", hardware=hardware.describe(), version=__version__)


def _row(version: str) -> dict:
    matrix = load_matrix()
    row = matrix["matrix"].get(version)
    if row is None:
        raise NotInMatrix(f"sglang {version} is not in the compatibility matrix; known releases: {', '.join(matrix['releases'])}")
    return row


def matrix_context(version: str, entry: dict, hardware=None) -> Context:
    """A release as the matrix recorded it: each target's state, the feature gate's reason."""

    def read(target):
        places = [target.key] + [f"{module}:{qualname}" for module, qualname in target.moved]
        key = next((k for k in places if k in entry.get("targets", {})), None)
        if key is None:
            return Source(state=TargetState.ABSENT, reason=f"{target.key} not recorded for sglang {version}")
        recorded = entry["targets"][key]
        try:
            state = TargetState(recorded["state"])
        except ValueError:
            state = TargetState.DRIFTED
        return Source(state=state, reason=f"{key} is {recorded['state']} in sglang {version} (matrix)", fingerprint=recorded.get("fingerprint"))

    def feature(patch):
        gated = entry.get("state") == "not-applicable" and release_reason(patch, version) is None
        return entry.get("reason") if gated else None

    return Context(sglang_root=f"(matrix: sglang {version})", version=version, read=read, hardware=hardware, feature=feature)


def pin(names: Optional[list], hardware_kind: Optional[str] = None) -> tuple[str, list]:
    """(pip requirement, releases) covering the releases where every named patch applies or is upstream."""
    matrix = load_matrix()
    patches = all_patches()
    if not names:
        names = [n for n, p in patches.items() if hardware_kind is None or any(hardware_kind in (part.hardware or p.hardware) for part in p.parts)]
    releases = [Version(v) for v in matrix["releases"]]
    good = [v for v in releases if all(_usable(patches[n], str(v), matrix["matrix"][str(v)].get(n)) for n in names)]
    if not good:
        return "", []
    low, high = good[0], good[-1]
    excluded = [v for v in releases if low <= v <= high and v not in good]
    spec = [f">={low}", f"<={high}"] + [f"!={v}" for v in excluded]
    return "sglang" + ",".join(spec), [str(v) for v in good]


def _usable(patch, version: str, entry) -> bool:
    """Whether the patch applies or is upstream on a release of the matrix (the one decision)."""
    if entry is None:
        return False
    return decide(patch, matrix_context(version, entry)).state in (State.APPLIES, State.UPSTREAM)
