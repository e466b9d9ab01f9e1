"""Post-import hooks: call a function right after a named module has been executed.

A small meta-path finder rather than wrapt's importer: importing wrapt 2.x pulls
in asyncio, which cost every Python process about 55 ms at start-up when
SGL_ACCEL is set (measured with ``python -X importtime``). The finder only
answers for the watched names, wraps their loader for the one import, and puts
the real loader back on the module before the hooks run, so nothing after the
import can tell it was there.
"""

import _thread  # not threading: start-up imports this module, and _thread is already loaded
import sys

_lock = _thread.RLock()
_hooks: dict = {}  # module name -> [callable(module)]
_ran: dict = {}  # name -> id of the module object whose code has run (the import system may still say "initializing")


def has_run(name: str) -> bool:
    """Whether the code of the watched module now in sys.modules has finished running."""
    return _ran.get(name) == id(sys.modules.get(name))


class _HookedLoader:
    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def __getattr__(self, attr):  # get_source, get_resource_reader, ... of the real loader
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        spec = module.__spec__
        spec.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        _ran[self._name] = id(module)
        _fire(self._name, module)


class _Finder:  # the meta-path finder protocol: find_spec only
    def __init__(self):
        self._resolving = _thread._local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _hooks:
            return None
        busy = self._resolving.__dict__.setdefault("names", set())
        if fullname in busy:
            return None
        busy.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            busy.discard(fullname)
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, fullname)
        return spec


_finder = _Finder()


def _fire(name: str, module) -> None:
    with _lock:
        hooks = list(_hooks.get(name, ()))
    for hook in hooks:
        hook(module)


def when_imported(name: str, hook, now: bool = True) -> None:
    """Call ``hook(module)`` after every import of ``name`` (a reload included); also at once if
    it is imported already (``now``), or when another thread finishes importing it."""
    with _lock:
        _hooks.setdefault(name, []).append(hook)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        module = sys.modules.get(name)
    if module is None:
        return
    if getattr(getattr(module, "__spec__", None), "_initializing", False):
        # Mid-import (maybe in another thread): that import has passed the finder already.
        import threading

        threading.Thread(target=_after_import, args=(name, hook), name=f"sgl-accel {name}", daemon=True).start()
    elif now:
        hook(module)


def _after_import(name: str, hook) -> None:
    """Wait for the import of ``name`` in progress to finish, then run ``hook``."""
    import time

    try:  # the module's import lock is held until its import is done
        from importlib import _bootstrap

        _bootstrap._lock_unlock_module(name)
    except Exception:
        pass
    module = sys.modules.get(name)
    while module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
        time.sleep(0.005)
        module = sys.modules.get(name)
    if module is not None:
        hook(module)
