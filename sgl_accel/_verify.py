"""``sgl-accel verify``: run each patch's equivalence cases on this machine.

On real hardware the patches are applied as ``apply()`` would (gates included)
and checked with the real kernels; ``emulate=True`` runs the same cases on CPU
with the test-bed kernels (refused where a real torch_npu is installed).
With ``SGL_ACCEL_VERIFY=1`` the loader runs a patch's cases right after
applying it and rolls the patch back when one fails.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass, field


@dataclass
class CaseResult:
    name: str
    passed: bool
    max_deviation: float
    details: list = field(default_factory=list)  # "what: diff (tolerance)" lines


@dataclass
class PatchVerification:
    patch: str
    outcome: str  # pass | fail | not-run
    reason: str
    max_deviation: float = 0.0
    cases: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def load_cases(name: str) -> list:
    from ._registry import cases_module

    module_name = cases_module(name)
    if module_name is None:
        return []
    return list(importlib.import_module(module_name).CASES)


def run_cases(name: str, seed: int = 0) -> PatchVerification:
    """Run the cases of an applied patch. Never raises: an exception is a failed case."""
    cases = load_cases(name)
    if not cases:
        return PatchVerification(name, "not-run", "no equivalence cases")
    results, worst = [], 0.0
    for case in cases:
        try:
            comparisons = case.run(seed)
            passed = all(c.passed for c in comparisons)
            deviation = max((c.max_abs_diff for c in comparisons), default=0.0)
            details = [f"{c.what}: {c.max_abs_diff:.3g} ({'exact' if c.exact else f'tol {c.tolerance:.3g}'}){' ' + c.note if c.note else ''}" for c in comparisons if not c.passed]
        except Exception as exc:  # the case itself broke: that is a failure to report
            passed, deviation, details = False, math.inf, [f"{type(exc).__name__}: {exc}"]
        results.append(CaseResult(case.name, passed, deviation, details))
        worst = max(worst, deviation)
    failed = [r.name for r in results if not r.passed]
    outcome = "fail" if failed else "pass"
    reason = f"{len(results) - len(failed)}/{len(results)} cases pass" + (f"; failing: {', '.join(failed)}" if failed else "")
    return PatchVerification(name, outcome, reason, worst, [asdict(r) for r in results])


def verify(names=None, emulate: bool = False, seed: int = 0) -> list:
    """Apply (gates as usual; ``emulate``: forced, on the test-bed kernels), run the cases, revert."""
    from . import _loader
    from ._registry import all_patches, resolve_names

    names = resolve_names(names)
    if emulate:
        from .testing import standins

        standins.activate()
    out = []
    for name in names:
        patch = all_patches()[name]
        try:
            for module in _loader.modules_of(patch):
                importlib.import_module(module)
        except Exception as exc:
            out.append(PatchVerification(name, "not-run", f"cannot import its targets: {type(exc).__name__}: {exc}"))
            continue
        already = _loader.status([name])[name].state == "applied"
        report = _loader.apply([name], force=emulate, allow_untested=emulate)[name]
        if report.state != "applied":
            out.append(PatchVerification(name, "not-run", f"{report.state}: {report.reason}"))
            continue
        try:
            out.append(run_cases(name, seed))
        finally:
            if not already:
                _loader.revert([name])
    return out
