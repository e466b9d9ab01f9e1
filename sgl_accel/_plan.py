"""What apply() would do, decided from source files without importing sglang.

Used by ``sgl-accel status``/``diff`` (the installed sglang) and by the
compatibility scanner (an unpacked release wheel). The gates are the loader's
own, in the loader's order; the structural guard is the same ``check_def``.
"""

from __future__ import annotations

import ast
import difflib
from typing import Optional

from ._guard import check_static, module_file, resolved_parts
from ._registry import Patch, all_patches
from ._report import PatchReport, TargetReport, overall_state


def plan_patch(patch: Patch, sglang_root: Optional[str], version: Optional[str], hardware=None, check_kernels: bool = True, check_tested: bool = True) -> PatchReport:
    """The state apply() would reach. ``hardware`` None: judge the source only.

    States: applies (what "applied" would be), upstream, not-applicable, skipped.
    """
    from ._loader import _post  # same release rule as the loader

    def report(state, reason, parts=None, targets=None):
        return PatchReport(patch.name, state, reason, patch.kind, patch.upstream_pr, parts or {}, targets or [])

    if sglang_root is None:
        return report("not-applicable", "sglang is not installed")
    if patch.releases and version:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version

        try:
            v = Version(version)
            if not SpecifierSet(patch.releases).contains(Version(v.base_version + _post(v)), prereleases=True):
                return report("not-applicable", f"sglang {version} is outside {patch.releases}")
        except InvalidVersion:
            pass
    parts, targets, applies = {}, [], False
    for part, part_targets in resolved_parts(patch, sglang_root):
        allowed = tuple(part.hardware) or tuple(patch.hardware)
        if hardware is not None and hardware.kind not in allowed:
            parts[part.name] = f"not-applicable: needs {'/'.join(allowed)}, found {hardware.describe()}"
            continue
        if hardware is not None and patch.hardware_check is not None:
            reason = patch.hardware_check(hardware)
            if reason:
                parts[part.name] = f"not-applicable: {reason}"
                continue
        verdicts = [check_static(t, sglang_root) for t in part_targets]
        targets += [TargetReport(t.key, v.state, v.reason, v.fingerprint) for t, v in zip(part_targets, verdicts)]
        kinds = {v.state for v in verdicts}
        if kinds == {"upstream"}:
            parts[part.name] = "upstream"
        elif kinds == {"applies"}:
            from ._loader import _untested

            untested = _untested(part_targets, verdicts) if check_tested else None
            if untested:
                parts[part.name] = f"skipped: {untested}"
            else:
                parts[part.name] = "applies"
                applies = True
        else:
            bad = "; ".join(v.reason for v in verdicts if v.state != "applies")
            parts[part.name] = f"skipped: {'partly upstream, ' if 'upstream' in kinds else ''}{bad}"
    if applies and patch.gate is not None:
        from ._guard import SourceReader

        reason = patch.gate(SourceReader(sglang_root))
        if reason:
            return report("not-applicable", reason, parts, targets)
    if applies and hardware is not None and check_kernels and patch.kernels:
        from ._detect import kernel_available

        for symbol in patch.kernels:
            ok, detail = kernel_available(symbol)
            if not ok:
                return report("not-applicable", detail, parts, targets)
    if applies:
        return report("applies", "; ".join(f"{p}: {s}" for p, s in parts.items()), parts, targets)
    return report(*overall_state(parts, version), parts, targets)


def diff_patch(patch: Patch, sglang_root: str) -> tuple[bool, str]:
    """Unified diff between each installed target and its patched form (normalized source)."""
    chunks, ok = [], True
    for target in (t for _, targets in resolved_parts(patch, sglang_root) for t in targets):
        verdict = check_static(target, sglang_root)
        path = module_file(target.module, sglang_root)
        if verdict.state != "applies":
            ok = False
            chunks.append(f"# {target.key}: {verdict.state}: {verdict.reason}\n")
            continue
        before = ast.unparse(verdict.original).splitlines(keepends=True)
        after = ast.unparse(verdict.patched).splitlines(keepends=True)
        label = f"{path}:{target.qualname}"
        chunks.append("".join(difflib.unified_diff(before, after, f"a/{label} (installed)", f"b/{label} (sgl-accel {patch.name})")))
    return ok, "\n".join(chunks)
