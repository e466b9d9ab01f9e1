"""Equivalence cases: for each patch, realistic inputs for the real sglang objects,
run through the original and the patched target, compared output by output and
state by state (conv state, KV cache, buffers).

A patch's module here, ``sgl_accel.cases.<patch_module>``, defines
``CASES: list[Case]``. The tests run them on CPU with the test-bed kernels;
``sgl-accel verify`` runs them on the device actually present.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class Case:
    """One equivalence check.

    ``run(seed)`` builds its inputs, runs the original and the patched target on
    identical copies (the patch module knows how to get both: e.g. the loader's
    ``__sgl_accel_original__`` on the patched function), and returns a list of
    ``Comparison``.
    """

    patch: str
    name: str
    run: Callable[[int], list]
    description: str = ""


@dataclass
class Comparison:
    what: str  # e.g. "output", "conv_state line 3"
    max_abs_diff: float
    tolerance: float
    exact: bool = False  # True: must be bit-identical
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.exact:
            return self.max_abs_diff == 0.0
        return self.max_abs_diff <= self.tolerance


def compare(what: str, actual, expected, tolerance: float = 0.0, exact: bool = False, note: str = "") -> Comparison:
    """Largest absolute difference between two tensors (NaN/inf positions must agree)."""
    import torch

    if actual.shape != expected.shape:
        return Comparison(what, float("inf"), tolerance, exact, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    same_nonfinite = torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
    if not same_nonfinite:
        return Comparison(what, float("inf"), tolerance, exact, "NaN/inf positions differ")
    finite = torch.isfinite(a)
    if bool((a[~finite] != b[~finite]).any()):
        return Comparison(what, float("inf"), tolerance, exact, "inf signs differ")
    diff = (a[finite] - b[finite]).abs()
    return Comparison(what, float(diff.max()) if diff.numel() else 0.0, tolerance, exact, note)


def tolerance_for(dtype) -> float:
    """Absolute tolerance for outputs of O(1) magnitude in a given dtype."""
    import torch

    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 0.0)


# --------------------------------------------------------------------------- running a patch's cases


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
    from .._registry import cases_module

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
