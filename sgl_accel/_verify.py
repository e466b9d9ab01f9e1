"""``sgl-accel verify``: run each patch's equivalence cases on this machine.

On real hardware the patches are applied as ``apply()`` would (gates included)
and checked with the real kernels; ``emulate=True`` runs the same cases on CPU
with the test-bed kernels (refused where a real torch_npu is installed).
With ``SGL_ACCEL_VERIFY=1`` the loader runs a patch's cases right after
applying it (``cases.run_cases``) and rolls the patch back when one fails.
"""

from __future__ import annotations

import importlib

from . import _loader
from .cases import CaseResult, PatchVerification, load_cases, run_cases  # noqa: F401 (the seam's names)


def verify(names=None, emulate: bool = False, seed: int = 0) -> list:
    """Apply (gates as usual; ``emulate``: forced, on the test-bed kernels), run the cases, revert."""
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
