"""apply / revert / status: builds, swaps and reports what ``_decide.decide`` says.

A patched target replaces the original by direct attribute assignment on its
owner (a class or a module), so a patched hot path runs with no extra frame. The
replacement is the installed function's own source, rewritten by the patch's
rules and compiled in the target module's globals with the original's file name,
line numbers, qualname and closure cells (zero-argument ``super()`` keeps
working). ``revert()`` puts back the very objects that were there.

The loader decides nothing itself: it reads the live targets for ``decide`` (the
function in memory, its def in the file it was compiled from, or a cache entry),
then builds the rewritten functions, swaps them in all at once and reports.
"""

from __future__ import annotations

import linecache
import logging
import sys
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

from . import __version__
from ._cache import CodeCache, code_signature, entry_key, file_stamp, sgl_accel_digest
from ._config import read as read_settings
from ._decide import Context, Decision, Source, State, TargetState, decide, modules_of as _modules_in, source_feature
from ._guard import SourceReader
from ._detect import Hardware, SglangInstall, detect_hardware, hardware_override, kernel_available, sglang_install
from ._registry import Patch, Target, all_patches, default_names, patch_module_file, resolve_names
from ._report import PatchReport, Report, TargetReport
from ._rewrite import FACTORY, code_last_line, def_code_from_pyc, def_code_from_text, factory_code, future_flags, module_import_names, parse_def_at, run_factory

logger = logging.getLogger("sgl_accel")

_LOCK = threading.RLock()
PATCH_MARK = "__sgl_accel_patch__"


@dataclass(eq=False)
class _Swap:
    owner: object
    attr: str
    original: object  # the raw object from owner.__dict__ (staticmethod etc. kept)
    patched: object
    target: Optional[Target] = None  # None: a ``from x import f`` copy of a patched function

    def in_place(self) -> bool:
        """Whether the owner still holds our object and is still where the target lives."""
        if self.owner.__dict__.get(self.attr) is not self.patched:
            return False
        return self.target is None or _owner_of(self.target)[0] is self.owner


@dataclass
class _State:
    wanted: bool = False
    force: bool = False
    allow_untested: bool = False
    swaps: list = field(default_factory=list)
    report: Optional[PatchReport] = None


_states: dict = {}
_hooked_modules: set = set()
_hardware: Optional[Hardware] = None
_sglang: Optional[SglangInstall] = None


# --------------------------------------------------------------------------- public API


def apply(patches=None, *, force: bool = False, allow_untested: bool = False, disabled=(), announce: bool = True) -> Report:
    """Apply the named patches (None: all but the opt-in ones) whose gates hold; never raises for a patch.

    ``force`` skips the release, hardware, kernel and feature gates, never the
    structural guard. Targets whose module sglang has not imported yet are
    patched the moment it does (the report says ``pending-import``).
    """
    names = resolve_names(patches) if patches is not None else default_names()
    disabled = set(resolve_names(list(disabled))) if disabled else set()
    allow_untested = allow_untested or read_settings().allow_untested
    with _LOCK:
        for name in names:
            state = _states.setdefault(name, _State())
            if name in disabled:
                state.wanted = False
                state.report = _plain_report(name, State.SKIPPED, "disabled by SGL_ACCEL_DISABLE")
                continue
            state.wanted, state.force, state.allow_untested = True, force, allow_untested
            _try_apply(name)
        _replace_aliases(names)
        report = _report(names)
    if announce:
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
                _revert_swaps(name, state)
            elif state.report is None or state.report.state is State.PENDING_IMPORT:
                state.report = _plain_report(name, State.SKIPPED, "not applied")
        return _report(names)


def status(patches=None) -> Report:
    """What this process has done so far, per patch (never claims a patch its objects lost)."""
    names = resolve_names(patches)
    with _LOCK:
        return _report(names)


def settings():
    """The SGL_ACCEL* settings now (read from the environment each time: tests change it)."""
    return read_settings()


# --------------------------------------------------------------------------- context


def _sglang_info() -> SglangInstall:
    """The installed sglang. "Not installed" is never remembered: sys.path may grow later."""
    global _sglang
    if _sglang is None:
        found = sglang_install()
        if found.problem:
            from ._config import say_once

            say_once("WARNING", f"{found.problem}; judging the sglang source as {found.describe()}")
        if not found.installed:
            return found
        _sglang = found
    return _sglang


def _hardware_info() -> Hardware:
    global _hardware
    if _hardware is None:
        _hardware = detect_hardware()
    return _hardware


def _reset_for_tests() -> None:
    """Revert everything and forget detection results (the tests change the environment)."""
    global _hardware, _sglang
    with _LOCK:
        for state in _states.values():
            if state.swaps:
                _restore(state.swaps)
        _states.clear()
        _hardware = None
        _sglang = None


def modules_of(patch: Patch) -> list:
    """The modules of the patch's targets in the installed sglang (moved targets resolved)."""
    return _modules_in(patch, _sglang_info().location)


def _imported(name: str) -> bool:
    """In sys.modules and finished executing (a module another thread is importing is pending)."""
    from ._hooks import has_run

    module = sys.modules.get(name)
    if module is None:
        return False
    return has_run(name) or not getattr(getattr(module, "__spec__", None), "_initializing", False)


def live_context(patch: Patch, force: bool = False, allow_untested: bool = False) -> Context:
    """The context of this process: live functions, detected hardware, importable kernels."""
    info = _sglang_info()
    settings = read_settings()
    cache = CodeCache(settings.cache_dir if settings.cache else None)

    def tested(key, fingerprint):
        from .compat import is_tested

        return is_tested(key, fingerprint)

    return Context(
        sglang_root=info.location,
        version=info.version,
        read=lambda target: _read_live(patch, target, cache),
        hardware=None if force else _LazyHardware(),
        kernels=kernel_available,
        feature=source_feature(info.location) if info.location else None,
        tested=None if allow_untested else tested,
        missing_modules=lambda modules: [m for m in modules if not _imported(m)],
        force=force,
        reader=SourceReader(info.location) if info.location else None,
    )


class _LazyHardware:
    """Detected on first use: a patch waiting for an import never makes the loader import torch."""

    def __getattr__(self, name):
        return getattr(_hardware_info(), name)


# --------------------------------------------------------------------------- reading live targets


@dataclass
class _Live:
    target: Target
    owner: object
    attr: str
    raw: object
    function: object  # the innermost Python function
    module: object
    lines: list = field(default_factory=list)
    cache: Optional[CodeCache] = None
    cache_key: Optional[str] = None
    cached: bool = False  # the verdict came from the cache
    cached_code: object = None


def _owner_of(target: Target):
    """(owner, None) or (None, reason): the class or module whose __dict__ holds the target."""
    owner = sys.modules.get(target.module)
    if owner is None:
        return None, f"{target.module} is not imported"
    *path, attr = target.qualname.split(".")
    for part in path:
        owner = owner.__dict__.get(part) if hasattr(owner, "__dict__") else None
        if not isinstance(owner, type):
            return None, f"{target.module}.{part} is not a class"
    if attr not in owner.__dict__:
        return None, f"{target.qualname} is not defined in {target.module}"
    return owner, None


def _unwrap(raw):
    """(innermost object, [run-time or decorator wrappers, outermost first])."""
    obj = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    chain = []
    while len(chain) < 32:
        try:
            inner = obj.__dict__.get("__wrapped__") if hasattr(obj, "__dict__") else None
        except Exception:
            inner = None
        if inner is None:
            break
        chain.append(obj)
        obj = inner
    return obj, chain


def _describe(obj) -> str:
    code = getattr(obj, "__code__", None)
    if code is not None:
        return f"{code.co_name}() at {code.co_filename}:{code.co_firstlineno}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def _read_live(patch: Patch, target: Target, cache: Optional[CodeCache] = None) -> Source:
    """What ``decide`` judges for one live target: its def, a cache hit, or a state."""
    owner, reason = _owner_of(target)
    if owner is None:
        return Source(state=TargetState.ABSENT, reason=reason)
    raw = owner.__dict__[target.qualname.rsplit(".", 1)[-1]]
    function, wrappers = _unwrap(raw)
    refused = _foreign(target, function, wrappers)
    if refused:
        return Source(state=TargetState.WRAPPED, reason=refused)
    if getattr(function, PATCH_MARK, None):
        return Source(state=TargetState.DRIFTED, reason=f"{target.qualname} is already patched by sgl-accel ({getattr(function, PATCH_MARK)})")
    live = _Live(target, owner, target.qualname.rsplit(".", 1)[-1], raw, function, sys.modules[target.module], cache=cache)
    cached = _from_cache(patch, live, len(wrappers))
    if cached is not None:
        return cached
    node, reason = _live_def(live)
    if node is None:
        return Source(state=TargetState.DRIFTED, reason=reason)
    if len(wrappers) > len(node.decorator_list):  # more wrappers than the installed source writes
        return Source(state=TargetState.WRAPPED, reason=f"{target.qualname} is wrapped at run time by {_describe(wrappers[0])}; sgl-accel does not unwrap it")
    last_line = node.end_lineno
    confirm = lambda: None if _matches_memory(live, last_line) else f"{target.qualname} in memory differs from its source file (modified on disk, or replaced by other code)"  # noqa: E731
    return Source(node=node, confirm=confirm, handle=live, rewrite_in_place=True)


def _foreign(target: Target, function, wrappers) -> Optional[str]:
    """Why the object at the target's place is not the installed function (None if it is)."""
    name = f"{target.module}.{target.qualname}"
    if not isinstance(function, types.FunctionType):
        how = f"wrapped at run time by {_describe(wrappers[0])}" if wrappers else f"replaced at run time by {_describe(function)}"
        return f"{name} is {how}; sgl-accel does not unwrap it"
    if getattr(function, PATCH_MARK, None):
        return None
    module = sys.modules.get(target.module)
    if module is not None and function.__globals__ is not module.__dict__:  # another module's code
        return f"{name} is replaced at run time by {function.__module__}.{function.__qualname__} ({_describe(function)}); left alone"
    return None  # the module's own code: the structural guard judges its def


def _closure_of(function) -> dict:
    cells = function.__closure__ or ()
    values = {}
    for name, cell in zip(function.__code__.co_freevars, cells):
        try:
            values[name] = cell.cell_contents
        except ValueError:  # an empty cell
            values[name] = None
    return values


def _code_parts(code) -> tuple:
    consts = tuple(_code_parts(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return (code.co_code, code.co_names, code.co_varnames, code.co_freevars, consts)


def _source_lines(live: _Live) -> list:
    if not live.lines:
        code = live.function.__code__
        linecache.checkcache(code.co_filename)  # a stale cache would describe another file
        live.lines = linecache.getlines(code.co_filename, live.module.__dict__)
    return live.lines


def _live_def(live: _Live):
    """The def the live function was compiled from (read from its file)."""
    code = live.function.__code__
    lines = _source_lines(live)
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
    return node, None


_import_name_cache: dict = {}


def _import_names(live: _Live) -> tuple:
    lines = _source_lines(live)
    key = (live.function.__code__.co_filename, hash(tuple(lines)))
    if key not in _import_name_cache:
        _import_name_cache[key] = module_import_names(lines)
    return _import_name_cache[key]


def _matches_memory(live: _Live, last_line: int) -> bool:
    """Whether the function in memory was compiled from its file's lines up to ``last_line``
    (the end of its def): the same bytecode, names and constants as the file's byte-code
    cache when that cache is valid for the file (as import judges it), else as compiling
    those lines."""
    code = live.function.__code__
    rebuilt = def_code_from_pyc(code.co_filename, code.co_name, code.co_firstlineno)
    if rebuilt is None:
        rebuilt = def_code_from_text(_source_lines(live), code.co_firstlineno, last_line, code.co_name, code.co_filename, code.co_freevars, imported=_import_names(live), flags=future_flags(code))
    return rebuilt is not None and _code_parts(rebuilt) == _code_parts(code)


# --------------------------------------------------------------------------- the code-object cache


def _from_cache(patch: Patch, live: _Live, wrappers: int) -> Optional[Source]:
    """The verdict cached for this exact file and function in memory (see _cache), or None."""
    if live.cache is None or live.cache.directory is None:
        return None
    code = live.function.__code__
    stamp = file_stamp(code.co_filename)
    if not stamp:
        return None
    live.cache_key = entry_key(sgl_accel_digest(patch_module_file(patch)), patch.name, _rules_text(patch, live.target), live.target.key, stamp, code_signature(code), str(wrappers))
    hit = live.cache.get(live.cache_key)
    if hit is None:
        return None
    state, reason, fingerprint, live.cached_code = hit
    try:
        state = TargetState(state)
    except ValueError:
        return None
    live.cached = True
    return Source(state=state, reason=reason, fingerprint=fingerprint or None, handle=live)


def _remember_verdicts(decision: Decision) -> None:
    """Cache the guard's verdicts that will not be built (those are cached with their code)."""
    for part in decision.parts:
        for t in part.targets:
            live = getattr(t.source, "handle", None)
            if isinstance(live, _Live) and live.cache_key and not live.cached and t.state in (TargetState.UPSTREAM, TargetState.DRIFTED):
                live.cache.put(live.cache_key, t.state, t.reason, t.fingerprint or "")
                live.cached = True


def _rules_text(patch: Patch, target: Target) -> str:
    """The declaration of a patch registered at run time (no module file to digest)."""
    if patch_module_file(patch):
        return ""
    declared = [target, *[t for t in patch.targets if t.qualname == target.qualname]]
    return repr([(t.rules, t.upstream) for t in declared[1:]])


def _remember(live: _Live, decided, code) -> None:
    if live.cache_key is not None and live.cached_code is None:
        live.cache.put(live.cache_key, TargetState.APPLIES, decided.reason, decided.fingerprint or "", code)


# --------------------------------------------------------------------------- building


def build(live: _Live, decided, helpers: dict, name: str):
    """The patched form of one live target (installed nowhere). ``decided``: its TargetDecision."""
    closure = {**_closure_of(live.function), **helpers}
    clash = set(_closure_of(live.function)) & set(helpers)
    if clash:
        raise RuntimeError(f"helper names {sorted(clash)} clash with free variables of {live.target.qualname}")
    code = live.cached_code if _factory_takes(live.cached_code, closure) else None
    if code is None:
        if decided.patched is None:  # a cache entry for other helper names: judge the def again
            decided = _check_again(live)
        original = live.function.__code__
        code = factory_code(decided.patched, original.co_filename, tuple(closure), imported=_import_names(live), flags=future_flags(original))
        _remember(live, decided, code)
    new = run_factory(code, live.module.__dict__, closure)
    _finish(new, live, name)
    return new


def _factory_takes(code, closure: dict) -> bool:
    factory = next((c for c in getattr(code, "co_consts", ()) if isinstance(c, types.CodeType) and c.co_name == FACTORY), None)
    return factory is not None and factory.co_varnames[: factory.co_argcount] == tuple(closure)


def _check_again(live: _Live):
    from ._decide import check_target

    node, reason = _live_def(live)
    last_line = getattr(node, "end_lineno", 0)
    decided = check_target(live.target, Source(node=node, confirm=lambda: None if _matches_memory(live, last_line) else "memory differs", rewrite_in_place=True))
    if node is None or decided.state is not TargetState.APPLIES:
        raise RuntimeError(f"{live.target.qualname}: cache entry unusable and the target does not apply: {reason or decided.reason}")
    live.cached_code = None
    return decided


def _finish(new, live: _Live, name: str) -> None:
    """Names, defaults and marks of the new function as the original's."""
    function, _ = _unwrap(new)
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


def patched_forms(name: str, force: bool = True) -> dict:
    """{target key: (original raw object, patched object)} for a patch whose targets are imported;
    built as apply() builds them, installed nowhere. Raises RuntimeError naming what does not apply."""
    patch = all_patches()[name]
    with _LOCK:
        decision = decide(patch, live_context(patch, force=force, allow_untested=True))
    if decision.state is not State.APPLIES:
        raise RuntimeError(f"{name} does not apply here: {decision.state}: {decision.reason}")
    helpers = patch.helpers() if patch.helpers else {}
    targets = [t for part in decision.applicable() for t in part.targets]
    return {t.target.key: (t.source.handle.raw, build(t.source.handle, t, helpers, name)) for t in targets}


@contextmanager
def swapped(pairs):
    """Put ``(owner, attr, obj)`` in place for the duration of a block; what was there after
    (an attribute that was not there is removed again)."""
    missing = object()
    saved = [(owner, attr, vars(owner).get(attr, missing)) for owner, attr, _ in pairs]
    try:
        for owner, attr, obj in pairs:
            setattr(owner, attr, obj)
        yield
    finally:
        for owner, attr, obj in reversed(saved):
            if obj is not missing:
                setattr(owner, attr, obj)
            elif attr in vars(owner):
                delattr(owner, attr)


def applied_objects() -> dict:
    """{"owner.attr": patched object} for every target in place now."""
    with _LOCK:
        return {f"{getattr(s.owner, '__name__', s.owner)}.{s.attr}": s.patched for st in _states.values() for s in st.swaps if s.in_place()}


# --------------------------------------------------------------------------- applying


def _try_apply(name: str) -> None:
    """Decide and apply (or defer) one wanted patch. Never raises an Exception."""
    state = _states[name]
    patch = all_patches()[name]
    if not state.wanted or (state.swaps and all(s.in_place() for s in state.swaps)):
        return
    if state.swaps:  # a reload or other code put new objects there: judge and patch those
        _restore(state.swaps)
        state.swaps = []
    try:
        decision = decide(patch, live_context(patch, state.force, state.allow_untested))
        _remember_verdicts(decision)
        if decision.state is State.PENDING_IMPORT:
            _install_hooks(decision.missing)
        _install_hooks(modules_of(patch))  # a reload re-runs a module: the hook re-applies
        state.report = _swap_in(patch, state, decision) if decision.state is State.APPLIES else _decision_report(decision)
        if state.swaps and read_settings().verify:
            _verify_applied(name, state)
    except Exception as exc:  # a bug in a patch or in sgl-accel must not stop sglang
        _roll_back(name, state, f"{type(exc).__name__}: {exc}")
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: consistent, then go on raising
        _roll_back(name, state, f"interrupted by {type(exc).__name__}")
        raise


def _roll_back(name: str, state: _State, why: str) -> None:
    if state.swaps:
        _restore(state.swaps)
        state.swaps = []
    logger.warning("sgl-accel: %s failed and was rolled back: %s", name, why)
    state.report = _plain_report(name, State.FAILED, f"{why}; every target restored")


def _swap_in(patch: Patch, state: _State, decision: Decision) -> PatchReport:
    """Build every target of the applicable parts, then assign them all; all or nothing."""
    helpers = patch.helpers() if patch.helpers else {}
    chosen = [t for part in decision.applicable() for t in part.targets]
    built = [(t.source.handle, build(t.source.handle, t, helpers, patch.name)) for t in chosen]
    swaps: list = []
    try:
        for live, new in built:
            swaps.append(_Swap(live.owner, live.attr, live.raw, new, live.target))
            setattr(live.owner, live.attr, new)
    except BaseException:
        _restore(swaps)
        raise
    state.swaps = swaps
    return _decision_report(decision, applied=True)


def _replace_aliases(names) -> None:
    """``from x import f`` copies of the module-level functions just patched get the patched
    ones too. One pass over sglang's modules for all the patches of one apply() or import
    (each pass costs ~2.5 ms with sglang loaded); a module is looked at in Python only if a
    C-level test finds an original in it. Runs under _LOCK after the patches' own swaps."""
    replaced = {}  # id(original) -> (swap, patch name)
    for name in names:
        for swap in _states[name].swaps:
            if swap.target is not None and not isinstance(swap.owner, type) and swap.owner.__dict__.get(swap.attr) is swap.patched:
                replaced[id(swap.original)] = (swap, name)
    if not replaced:
        return
    originals = replaced.keys()
    # dict.copy and the id test run in C (no tuple per entry, no thread switch in between).
    for module_name, module in sys.modules.copy().items():
        namespace = getattr(module, "__dict__", None)
        if not module_name.startswith("sglang") or namespace is None or originals.isdisjoint(map(id, namespace.values())):
            continue
        for attr, value in list(namespace.items()):
            swap, name = replaced.get(id(value), (None, None))
            if swap is not None and value is swap.original and module is not swap.owner:
                try:
                    setattr(module, attr, swap.patched)
                except Exception as exc:  # a module type that refuses: that copy stays the original
                    logger.warning("sgl-accel: %s: could not patch the copy %s.%s: %s", name, module_name, attr, exc)
                    continue
                _states[name].swaps.append(_Swap(module, attr, swap.original, swap.patched))


def _restore(swaps: list) -> tuple:
    """Put back every original still ours; (swaps still patched, swaps other code replaced)."""
    stuck, replaced = [], []
    for swap in reversed(swaps):
        if swap.owner.__dict__.get(swap.attr) is not swap.patched:
            replaced.append(swap)
            continue
        try:
            setattr(swap.owner, swap.attr, swap.original)
        except Exception as exc:  # keep going: every other target is still restored
            stuck.append(swap)
            logger.warning("sgl-accel: could not restore %s.%s: %s: %s", getattr(swap.owner, "__name__", swap.owner), swap.attr, type(exc).__name__, exc)
    return stuck, replaced


def _revert_swaps(name: str, state: _State) -> None:
    swaps = state.swaps
    stuck, replaced = _restore(swaps)
    state.swaps = stuck  # a second revert retries exactly these
    for swap in replaced:
        logger.warning("sgl-accel: %s.%s was replaced by other code since it was patched; left to it", getattr(swap.owner, "__name__", swap.owner), swap.attr)

    def outcome(swap):
        if any(swap is s for s in stuck):
            return TargetState.APPLIED
        return TargetState.OVERWRITTEN if any(swap is s for s in replaced) else TargetState.REVERTED

    targets = [TargetReport(_swap_key(s), outcome(s)) for s in swaps if s.target is not None]
    if stuck:
        state.report = _plain_report(name, State.FAILED, f"revert failed; still patched: {', '.join(_swap_key(s) for s in stuck)}", targets)
    else:
        left = f"; left to other code: {', '.join(_swap_key(s) for s in replaced)}" if replaced else ""
        state.report = _plain_report(name, State.SKIPPED, "reverted" + left, targets)


def _swap_key(swap: _Swap) -> str:
    if swap.target is not None:
        return swap.target.key
    return f"{getattr(swap.owner, '__name__', swap.owner)}:{swap.attr}"


def _verify_applied(name: str, state: _State) -> None:
    """SGL_ACCEL_VERIFY: run the patch's equivalence cases now; roll back on failure."""
    from .cases import run_cases

    result = run_cases(name)
    if result.outcome == "fail":
        _restore(state.swaps)
        state.swaps = []
        state.report = _plain_report(name, State.FAILED, f"verification failed ({result.reason}); every target restored")
        logger.warning("sgl-accel: %s failed verification and was rolled back: %s", name, result.reason)
    else:
        state.report.reason += f"; verified: {result.reason}"


# --------------------------------------------------------------------------- reports


def _plain_report(name: str, state: State, reason: str, targets=None) -> PatchReport:
    patch = all_patches()[name]
    return PatchReport(name=name, state=state, reason=reason, kind=patch.kind, upstream_pr=patch.upstream_pr, targets=targets or [], opt_in=patch.opt_in)


def _decision_report(decision: Decision, applied: bool = False) -> PatchReport:
    """The report of a decision; ``applied``: its applicable parts were swapped in."""
    done = set(id(p) for p in decision.applicable()) if applied else set()
    parts = {p.name: "applied" if id(p) in done else p.text() for p in decision.parts}
    targets = [
        TargetReport(t.target.key, TargetState.APPLIED if id(p) in done else t.state, t.reason, t.fingerprint)
        for p in decision.parts
        for t in p.targets
    ]
    patch = decision.patch
    state, reason = (State.APPLIED, _applied_reason(decision)) if applied else (decision.state, decision.reason)
    return PatchReport(patch.name, state, reason, patch.kind, patch.upstream_pr, parts, targets, patch.opt_in)


def _applied_reason(decision: Decision) -> str:
    patch = decision.patch
    parts = "" if len(patch.parts) == 1 else " (" + "; ".join(f"{p.name}: {'applied' if p.state is State.APPLIES else p.text()}" for p in decision.parts) + ")"
    kernels = f"; using {', '.join(decision.kernels_found)}" if decision.kernels_found else ""
    count = sum(len(p.targets) for p in decision.applicable())
    return f"{count} target(s) rewritten{parts}{kernels}"


def _report(names) -> Report:
    patches = [_current_report(name) for name in names]
    hardware = _hardware.describe() if _hardware is not None else _hardware_hint()
    return Report(patches=patches, sglang=_sglang_info().describe(), hardware=hardware, version=__version__)


def _current_report(name: str) -> PatchReport:
    state = _states.get(name)
    if state is None or state.report is None:
        return _plain_report(name, State.SKIPPED, "not requested")
    gone = [s for s in state.swaps if not s.in_place()]
    if state.report.state is State.APPLIED and gone:
        where = ", ".join(_swap_key(s) for s in gone)
        return _plain_report(name, State.SKIPPED, f"no longer in effect: {where} replaced since (module reloaded or patched by other code)", state.report.targets)
    return state.report


def _hardware_hint() -> str:
    try:
        override = hardware_override()
    except Exception:
        return "hardware not detected"
    return override.describe() if override else "hardware not detected yet"


# --------------------------------------------------------------------------- lazy import hooks


def _install_hooks(modules) -> None:
    from ._hooks import when_imported

    for module in modules:
        if module not in _hooked_modules:
            _hooked_modules.add(module)
            when_imported(module, _on_import, now=False)


def _on_import(module) -> None:
    """Runs right after a target module is imported (or re-executed by a reload). Never raises."""
    try:
        with _LOCK:
            tried = []
            for name, state in list(_states.items()):
                patch = all_patches().get(name)
                if patch is None or not state.wanted or module.__name__ not in modules_of(patch):
                    continue
                before = state.report.state if state.report else None
                _try_apply(name)
                tried.append(name)
                report = state.report
                if report is not None and report.state != before:
                    logger.info("sgl-accel: %s %s on import of %s (%s)", name, report.state, module.__name__, report.reason)
            _replace_aliases(tried)
    except Exception as exc:
        logger.warning("sgl-accel: import hook for %s failed: %s", getattr(module, "__name__", module), exc)
