"""apply / revert / status: the gated, atomic, lazy patch machinery.

A patched target replaces the original by direct attribute assignment on its
owner (a class or a module), so a patched hot path runs with no extra frame. The
replacement is the installed function's own source, rewritten by the patch's
rules and compiled in the target module's globals with the original's file name,
line numbers, qualname and closure cells (zero-argument ``super()`` keeps
working). ``revert()`` puts back the very objects that were there.
"""

from __future__ import annotations

import linecache
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional

from . import __version__
from ._detect import Hardware, SglangInstall, detect_hardware, hardware_override, kernel_available, sglang_install
from ._guard import SourceReader, Verdict, check_def, resolved_parts
from ._registry import Patch, Target, all_patches, default_names, resolve_names
from ._report import PatchReport, Report, TargetReport, overall_state
from ._rewrite import code_last_line, compile_def, future_flags, module_import_names, parse_def_at

logger = logging.getLogger("sgl_accel")

_LOCK = threading.RLock()
PATCH_MARK = "__sgl_accel_patch__"


@dataclass
class _Swap:
    owner: object
    attr: str
    original: object  # the raw object from owner.__dict__ (staticmethod etc. kept)
    patched: object


@dataclass
class _State:
    wanted: bool = False
    force: bool = False
    allow_untested: bool = False
    swaps: list = field(default_factory=list)
    report: Optional[PatchReport] = None


_states: dict = {}
_hooked_modules: set = set()
_resolved: dict = {}  # patch name -> [(part, [targets as named in the installed sglang])]
_hardware: Optional[Hardware] = None
_sglang: Optional[SglangInstall] = None


# --------------------------------------------------------------------------- public API


def apply(patches=None, *, force: bool = False, allow_untested: bool = False, disabled=()) -> Report:
    """Apply the named patches (None: all) whose gates hold; never raises for a patch.

    ``force`` skips the release, hardware, kernel and feature gates, never the
    structural guard. Targets whose module sglang has not imported yet are
    patched the moment it does (the report says ``pending-import``).
    """
    names = resolve_names(patches) if patches is not None else default_names()
    disabled = set(resolve_names(list(disabled))) if disabled else set()
    allow_untested = allow_untested or os.environ.get("SGL_ACCEL_ALLOW_UNTESTED", "").strip().lower() in ("1", "true", "on", "yes")
    with _LOCK:
        for name in names:
            state = _states.setdefault(name, _State())
            if name in disabled:
                state.wanted = False
                state.report = _patch_report(name, "skipped", "disabled by SGL_ACCEL_DISABLE")
                continue
            state.wanted, state.force, state.allow_untested = True, force, allow_untested
            _try_apply(name)
        report = _report(names)
    logger.info(report.summary())
    for patch in report:
        logger.debug("%s: %s (%s)", patch.name, patch.state, patch.reason)
    return report


def revert(patches=None) -> Report:
    """Put back the original objects of the named patches (None: all)."""
    names = resolve_names(patches)
    with _LOCK:
        for name in names:
            state = _states.setdefault(name, _State())
            state.wanted = False
            if state.swaps:
                _restore(state.swaps)
                state.swaps = []
                state.report = _patch_report(name, "skipped", "reverted")
            elif state.report is None or state.report.state == "pending-import":
                state.report = _patch_report(name, "skipped", "not applied")
        return _report(names)


def status(patches=None) -> Report:
    """What this process has done so far, per patch."""
    names = resolve_names(patches)
    with _LOCK:
        return _report(names)


# --------------------------------------------------------------------------- context


def _sglang_info() -> SglangInstall:
    global _sglang
    if _sglang is None:
        _sglang = sglang_install()
    return _sglang


def _hardware_info() -> Hardware:
    global _hardware
    if _hardware is None:
        _hardware = detect_hardware()
    return _hardware


def _reset_for_tests() -> None:
    """Forget detection results and per-patch state (the tests change the environment)."""
    global _hardware, _sglang
    with _LOCK:
        for state in _states.values():
            if state.swaps:
                _restore(state.swaps)
        _states.clear()
        _resolved.clear()
        _hardware = None
        _sglang = None


def _parts(patch: Patch) -> list:
    if patch.name not in _resolved:
        _resolved[patch.name] = resolved_parts(patch, _sglang_info().location)
    return _resolved[patch.name]


def modules_of(patch: Patch) -> list:
    """The modules of the patch's targets in the installed sglang (moved targets resolved)."""
    return sorted({t.module for _, targets in _parts(patch) for t in targets})


def _report(names) -> Report:
    patches = []
    for name in names:
        state = _states.get(name)
        patches.append(state.report if state and state.report else _patch_report(name, "skipped", "not requested"))
    sglang = _sglang_info().describe()
    hardware = _hardware.describe() if _hardware is not None else _hardware_hint()
    return Report(patches=patches, sglang=sglang, hardware=hardware, version=__version__)


def _hardware_hint() -> str:
    try:
        override = hardware_override()
    except Exception:
        return "hardware not detected"
    return override.describe() if override else "hardware not detected yet"


def _patch_report(name, state, reason, parts=None, targets=None) -> PatchReport:
    patch = all_patches()[name]
    return PatchReport(
        name=name,
        state=state,
        reason=reason,
        kind=patch.kind,
        upstream_pr=patch.upstream_pr,
        parts=parts or {},
        targets=targets or [],
    )


# --------------------------------------------------------------------------- gates


def _release_gate(patch: Patch) -> Optional[str]:
    info = _sglang_info()
    if not info.installed:
        return "sglang is not installed"
    if not patch.releases:
        return None
    if info.version is None:
        return None  # unknown version (bare source tree): the structural guard decides
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        version = Version(info.version)
    except InvalidVersion:
        return None
    # A dev or local build (0.5.12.post1.dev3+g1234abc) is judged as its release.
    if not SpecifierSet(patch.releases).contains(Version(version.base_version + _post(version)), prereleases=True):
        return f"sglang {info.version} is outside {patch.releases}"
    return None


def _post(version) -> str:
    return f".post{version.post}" if version.post is not None else ""


def _hardware_gate(patch: Patch, part) -> Optional[str]:
    allowed = tuple(part.hardware) or tuple(patch.hardware)
    hw = _hardware_info()
    if hw.kind not in allowed:
        return f"needs {'/'.join(allowed)}, found {hw.describe()}"
    if patch.hardware_check is not None:
        return patch.hardware_check(hw)
    return None


def _kernel_gate(patch: Patch) -> tuple[Optional[str], list]:
    found = []
    for symbol in patch.kernels:
        ok, detail = kernel_available(symbol)
        if not ok:
            return detail, found
        found.append(detail)
    return None, found


# --------------------------------------------------------------------------- live targets


@dataclass
class _Live:
    target: Target
    owner: object
    attr: str
    raw: object
    function: object  # the innermost Python function
    module: object
    imported: tuple = ()  # the module's import-bound names (see _rewrite.module_import_names)


_import_name_cache: dict = {}


def _import_names(filename: str, lines: list) -> tuple:
    key = (filename, hash(tuple(lines)))
    if key not in _import_name_cache:
        _import_name_cache[key] = module_import_names(lines)
    return _import_name_cache[key]


def _resolve_live(target: Target):
    """(live, None) or (None, reason)."""
    import inspect

    module = sys.modules.get(target.module)
    if module is None:
        return None, f"{target.module} is not imported"
    owner = module
    *path, attr = target.qualname.split(".")
    for part in path:
        owner = owner.__dict__.get(part) if hasattr(owner, "__dict__") else None
        if not isinstance(owner, type):
            return None, f"{target.module}.{part} is not a class"
    if attr not in owner.__dict__:
        return None, f"{target.qualname} is not defined in {target.module}"
    raw = owner.__dict__[attr]
    function = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    function = inspect.unwrap(function)
    if not inspect.isfunction(function):
        return None, f"{target.qualname} is not a Python function"
    return _Live(target, owner, attr, raw, function, module), None


def _closure_of(function) -> dict:
    cells = function.__closure__ or ()
    values = {}
    for name, cell in zip(function.__code__.co_freevars, cells):
        try:
            values[name] = cell.cell_contents
        except ValueError:  # an empty cell
            values[name] = None
    return values


def _code_signature(code) -> tuple:
    import inspect

    consts = tuple(_code_signature(c) if inspect.iscode(c) else repr(c) for c in code.co_consts)
    return (code.co_code, code.co_names, code.co_varnames, code.co_freevars, consts)


def _live_def(live: _Live):
    """The def the live function was compiled from (read from its file)."""
    code = live.function.__code__
    linecache.checkcache(code.co_filename)  # a stale cache would describe another file
    lines = linecache.getlines(code.co_filename, live.module.__dict__)
    if not lines:
        return None, f"source of {live.target.qualname} is not available ({code.co_filename})"
    # co_firstlineno is the first decorator's line for decorated functions.
    node = None
    for last in (code_last_line(code), 0):  # 0: tokenize the block (slower)
        try:
            node = parse_def_at(lines, code.co_firstlineno, last)
            break
        except (SyntaxError, IndexError):
            continue
    if node is None or node.name != live.attr:
        return None, f"source at {code.co_filename}:{code.co_firstlineno} is not {live.target.qualname}"
    live.imported = _import_names(code.co_filename, lines)
    return node, None


def _matches_memory(live: _Live, node) -> bool:
    """Whether the function in memory was compiled from ``node`` (same bytecode)."""
    code = live.function.__code__
    rebuilt = compile_def(node, code.co_filename, live.module.__dict__, _closure_of(live.function), decorators=False, imported=live.imported, flags=future_flags(code))
    return _code_signature(rebuilt.__code__) == _code_signature(code)


def _verdict_live(target: Target):
    """(live, verdict) for a target whose module is imported."""
    live, reason = _resolve_live(target)
    if live is None:
        return None, Verdict("absent", reason)
    if getattr(live.function, PATCH_MARK, None):
        return live, Verdict("drifted", f"{target.qualname} is already patched by sgl-accel ({getattr(live.function, PATCH_MARK)})")
    node, reason = _live_def(live)
    if node is None:
        return live, Verdict("drifted", reason)
    verdict = check_def(target, node, SourceReader(_sglang_info().location))
    # Only code about to be rewritten needs the (costlier) proof that memory matches the file.
    if verdict.state == "applies" and not _matches_memory(live, node):
        return live, Verdict("drifted", f"{target.qualname} in memory differs from its source file (modified on disk, or replaced by other code)", verdict.fingerprint)
    return live, verdict


# --------------------------------------------------------------------------- applying


def _try_apply(name: str) -> None:
    """Evaluate gates and apply (or defer) one wanted patch. Never raises."""
    state = _states[name]
    patch = all_patches()[name]
    if not state.wanted or state.swaps:
        return
    try:
        state.report = _evaluate_and_apply(patch, state)
        if state.swaps and os.environ.get("SGL_ACCEL_VERIFY", "").strip() == "1":
            _verify_applied(name, state)
    except Exception as exc:  # a bug in a patch or in sgl-accel must not stop sglang
        if state.swaps:
            _restore(state.swaps)
            state.swaps = []
        logger.warning("sgl-accel: %s failed and was rolled back: %s: %s", name, type(exc).__name__, exc)
        state.report = _patch_report(name, "failed", f"{type(exc).__name__}: {exc}; every target restored")


def _verify_applied(name: str, state: _State) -> None:
    """SGL_ACCEL_VERIFY=1: run the patch's equivalence cases now; roll back on failure."""
    from ._verify import run_cases

    result = run_cases(name)
    if result.outcome == "fail":
        _restore(state.swaps)
        state.swaps = []
        state.report = _patch_report(name, "failed", f"verification failed ({result.reason}); every target restored")
        logger.warning("sgl-accel: %s failed verification and was rolled back: %s", name, result.reason)
    else:
        state.report.reason += f"; verified: {result.reason}"


def _evaluate_and_apply(patch: Patch, state: _State) -> PatchReport:
    name = patch.name
    info = _sglang_info()
    if not info.installed:
        return _patch_report(name, "not-applicable", "sglang is not installed")
    if not state.force:
        reason = _release_gate(patch)
        if reason:
            return _patch_report(name, "not-applicable", reason)
    missing = [m for m in modules_of(patch) if m not in sys.modules]
    if missing:
        # A module this sglang does not have will never be imported: say so now.
        from ._guard import module_file

        absent = [m for m in missing if m.startswith("sglang.") and module_file(m, info.location) is None]
        if absent:
            return _patch_report(name, "not-applicable", f"sglang {info.version} has no {', '.join(absent)}")
        # Hardware, kernels and the structural guard wait for the import: by then
        # sglang has imported torch (and torch_npu), so probing them costs nothing extra.
        _install_hooks(missing)
        return _patch_report(name, "pending-import", f"waits for sglang to import {', '.join(missing)}")

    targets: list = []
    part_states: dict = {}
    chosen: list = []  # (part, [(live, verdict)])
    kernels_found: list = []
    for part, part_targets in _parts(patch):
        if not state.force:
            reason = _hardware_gate(patch, part)
            if reason:
                part_states[part.name] = f"not-applicable: {reason}"
                continue
        checked = [_verdict_live(t) for t in part_targets]
        for target, (live, verdict) in zip(part_targets, checked):
            targets.append(TargetReport(target.key, verdict.state, verdict.reason, verdict.fingerprint))
        kinds = {v.state for _, v in checked}
        if kinds == {"upstream"}:
            part_states[part.name] = "upstream"
            continue
        if kinds != {"applies"}:
            bad = [v.reason for _, v in checked if v.state != "applies"]
            prefix = "partly upstream, " if "upstream" in kinds else ""
            part_states[part.name] = f"skipped: {prefix}{'; '.join(bad)}"
            continue
        untested = _untested(part_targets, [v for _, v in checked])
        if untested and not state.allow_untested:
            part_states[part.name] = f"skipped: {untested}"
            continue
        if not state.force:
            reason, kernels_found = _kernel_gate(patch)
            if reason is None and patch.gate is not None:
                reason = patch.gate(SourceReader(_sglang_info().location))
            if reason:
                part_states[part.name] = f"not-applicable: {reason}"
                continue
        part_states[part.name] = "applies"
        chosen.append((part, checked))

    if chosen:
        helpers = patch.helpers() if patch.helpers else {}
        new_objects = []
        for part, checked in chosen:
            for live, verdict in checked:
                new_objects.append((live, _build(live, verdict, helpers, name)))
        for live, new in new_objects:
            state.swaps.append(_Swap(live.owner, live.attr, live.raw, new))
            setattr(live.owner, live.attr, new)
            _replace_aliases(state, live, new)
        for part, _ in chosen:
            part_states[part.name] = "applied"
        for t in targets:
            if t.state == "applies":
                t.state = "applied"
        return _patch_report(name, "applied", _applied_reason(patch, part_states, kernels_found), part_states, targets)
    return _patch_report(name, *overall_state(part_states, _sglang_info().version), part_states, targets)


def _untested(targets, verdicts) -> Optional[str]:
    """The tested-source policy: every target's fingerprint must be one the matrix saw."""
    from .compat import is_tested

    unseen = [f"{t.qualname} fingerprint {v.fingerprint}" for t, v in zip(targets, verdicts) if not is_tested(t.key, v.fingerprint)]
    if not unseen:
        return None
    return "untested source (" + ", ".join(unseen) + "); set SGL_ACCEL_ALLOW_UNTESTED=1 to apply anyway"


def _build(live: _Live, verdict: Verdict, helpers: dict, name: str):
    import inspect

    closure = _closure_of(live.function)
    clash = set(closure) & set(helpers)
    if clash:
        raise RuntimeError(f"helper names {sorted(clash)} clash with free variables of {live.target.qualname}")
    code = live.function.__code__
    new = compile_def(verdict.patched, code.co_filename, live.module.__dict__, {**closure, **helpers}, imported=live.imported, flags=future_flags(code))
    function = new.__func__ if isinstance(new, (staticmethod, classmethod)) else new
    function = inspect.unwrap(function)
    function.__qualname__ = live.function.__qualname__
    if new is not function and not isinstance(new, (staticmethod, classmethod)):
        try:  # a decorator's wrapper copied the factory-local name before we fixed it
            new.__qualname__ = getattr(live.raw, "__qualname__", live.function.__qualname__)
        except (AttributeError, TypeError):
            pass
    function.__defaults__ = live.function.__defaults__
    function.__kwdefaults__ = live.function.__kwdefaults__
    setattr(function, PATCH_MARK, name)
    function.__sgl_accel_original__ = live.raw
    return new


def _replace_aliases(state: _State, live: _Live, new) -> None:
    """``from x import f`` copies of a module-level function get the patched one too."""
    if isinstance(live.owner, type):
        return
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("sglang") or module is live.owner:
            continue
        namespace = getattr(module, "__dict__", {})
        for attr, value in list(namespace.items()):
            if value is live.raw:
                state.swaps.append(_Swap(module, attr, live.raw, new))
                setattr(module, attr, new)


def _restore(swaps: list) -> None:
    for swap in reversed(swaps):
        if swap.owner.__dict__.get(swap.attr) is swap.patched:
            setattr(swap.owner, swap.attr, swap.original)
        else:
            logger.warning("sgl-accel: %s.%s was replaced by other code since it was patched; left as is", getattr(swap.owner, "__name__", swap.owner), swap.attr)


def _applied_reason(patch: Patch, part_states: dict, kernels_found: list) -> str:
    parts = "" if len(patch.parts) == 1 else " (" + "; ".join(f"{p}: {s}" for p, s in part_states.items()) + ")"
    kernels = f"; using {', '.join(kernels_found)}" if kernels_found else ""
    return f"{len(patch.targets) if len(patch.parts) == 1 else 'some'} target(s) rewritten{parts}{kernels}"


# --------------------------------------------------------------------------- lazy import hooks


def _install_hooks(modules) -> None:
    from ._hooks import when_imported

    for module in modules:
        if module not in _hooked_modules:
            _hooked_modules.add(module)
            when_imported(module, _on_import)


def _on_import(module) -> None:
    """Runs right after sglang imports a target module. Never raises into the import."""
    try:
        with _LOCK:
            for name, state in list(_states.items()):
                patch = all_patches().get(name)
                if patch is None or not state.wanted or state.swaps:
                    continue
                if module.__name__ in modules_of(patch):
                    _try_apply(name)
                    report = state.report
                    if report is not None and report.state != "pending-import":
                        logger.info("sgl-accel: %s %s on import of %s (%s)", name, report.state, module.__name__, report.reason)
    except Exception as exc:
        logger.warning("sgl-accel: import hook for %s failed: %s", getattr(module, "__name__", module), exc)
