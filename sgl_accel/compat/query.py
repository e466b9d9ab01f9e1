"""Answers from the matrix: ``sgl-accel plan --sglang X`` and ``sgl-accel pin``."""

from __future__ import annotations

from typing import Optional

from packaging.version import Version

from .._registry import all_patches
from .._report import PatchReport, Report
from . import load_matrix


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
        parts = [p.name for p in usable]
        return "applies", f"parts {', '.join(parts)} apply{needs}"
    if state == "upstream":
        return "upstream", entry["reason"]
    if state == "absent":
        return "not-applicable", f"the target code does not exist in this release ({entry['reason']})"
    if state == "drifted":
        return "skipped", entry["reason"]
    return "not-applicable", entry["reason"]


def pin(names: Optional[list], hardware_kind: Optional[str] = None) -> tuple[str, list]:
    """(pip requirement, releases) covering the releases where every named patch applies or is upstream."""
    matrix = load_matrix()
    patches = all_patches()
    if not names:
        names = [n for n, p in patches.items() if hardware_kind is None or any(hardware_kind in (part.hardware or p.hardware) for part in p.parts)]
    releases = [Version(v) for v in matrix["releases"]]
    good = [v for v in releases if all(matrix["matrix"][str(v)].get(n, {}).get("state") in ("applies", "upstream") for n in names)]
    if not good:
        return "", []
    low, high = good[0], good[-1]
    excluded = [v for v in releases if low <= v <= high and v not in good]
    spec = [f">={low}", f"<={high}"] + [f"!={v}" for v in excluded]
    return "sglang" + ",".join(spec), [str(v) for v in good]
