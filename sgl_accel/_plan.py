"""What apply() would do, decided from source files without importing sglang.

Used by ``sgl-accel status``/``diff`` (the installed sglang) and by the
compatibility scanner (an unpacked release wheel). The decision is
``_decide.decide``, the one apply() makes; only the reader differs: the def is
read from the release's source instead of from the function in memory.
"""

from __future__ import annotations

import ast
import difflib
from typing import Optional

from ._decide import Context, Decision, Source, decide, parts_of, source_feature
from ._guard import SourceReader, check_static, module_file, static_def
from ._registry import Patch
from ._report import PatchReport, TargetReport


def source_context(sglang_root: Optional[str], version: Optional[str], hardware=None, check_kernels: bool = True, check_tested: bool = True) -> Context:
    """A release's source as the context: ``hardware`` None judges the source only."""
    kernels = None
    if hardware is not None and check_kernels:
        from ._detect import kernel_available

        kernels = kernel_available
    tested = None
    if check_tested:
        from .compat import is_tested

        tested = is_tested
    return Context(
        sglang_root=sglang_root,
        version=version,
        read=lambda target: Source(node=static_def(target, sglang_root)),
        hardware=hardware,
        kernels=kernels,
        feature=source_feature(sglang_root) if sglang_root else None,
        tested=tested,
        reader=SourceReader(sglang_root) if sglang_root else None,
    )


def plan_report(decision: Decision) -> PatchReport:
    """A decision as a report: states applies/upstream/not-applicable/skipped."""
    patch = decision.patch
    parts = {p.name: p.text() for p in decision.parts}
    targets = [TargetReport(t.target.key, t.state, t.reason, t.fingerprint) for t in decision.targets]
    return PatchReport(patch.name, decision.state, decision.reason, patch.kind, patch.upstream_pr, parts, targets, patch.opt_in)


def plan_patch(patch: Patch, sglang_root: Optional[str], version: Optional[str], hardware=None, check_kernels: bool = True, check_tested: bool = True) -> PatchReport:
    """The state apply() would reach. ``hardware`` None: judge the source only."""
    return plan_report(decide(patch, source_context(sglang_root, version, hardware, check_kernels, check_tested)))


def diff_patch(patch: Patch, sglang_root: str) -> tuple[bool, str]:
    """Unified diff between each installed target and its patched form (normalized source)."""
    chunks, ok = [], True
    for target in (t for _, targets in parts_of(patch, sglang_root) for t in targets):
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
