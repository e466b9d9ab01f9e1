"""Equivalence cases: for each patch, realistic inputs for the real sglang objects,
run through the original and the patched target, compared output by output and
state by state (conv state, KV cache, buffers).

A patch's module here, ``sgl_accel.cases.<patch_module>``, defines
``CASES: list[Case]``. The tests run them on CPU with the test-bed kernels;
``sgl-accel verify`` runs them on the device actually present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
