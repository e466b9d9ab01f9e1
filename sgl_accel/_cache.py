"""A persistent cache of rewritten code objects, so that apply() does not parse and compile again.

An entry is keyed on everything that determines the rewritten code: the sgl-accel version
and the text of its rewriting modules and of the patch's module, the patch and target
names, the whole text of the target's file, the signature of the live function's code
(bytecode, names, constants, flags, first line) and ``sys.implementation.cache_tag``. The
entry is written only after the structural guard passed and the function in memory was
shown to be compiled from that file text; a later process whose key matches has the same
file text and the same function in memory, so that proof still holds for it.

Where: ``SGL_ACCEL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/sgl-accel``, else
``~/.cache/sgl-accel``), one file per entry under a folder per Python cache tag. Off with
``SGL_ACCEL_CACHE=0``. Safe to delete at any time. Writes go to a temporary file renamed
into place (``os.replace``); every read is validated (magic, full key, types) and anything
unreadable, truncated, corrupt or stale is a miss: apply() then compiles as without a cache.
A read-only or missing directory only means nothing is stored.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import sys
import types

MAGIC = b"sgl-accel code cache 1\n"
_code_digests: dict = {}


def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return "unreadable"


def sgl_accel_digest(patch_module_file: str | None) -> str:
    """The sgl-accel code that shapes a rewrite: its version, the rewriting modules, the patch module."""
    from . import __version__

    here = os.path.dirname(__file__)
    files = [os.path.join(here, name) for name in ("_rewrite.py", "_guard.py", "_decide.py")] + [patch_module_file or ""]
    key = tuple(files)
    if key not in _code_digests:
        _code_digests[key] = hashlib.sha256("\0".join([__version__] + [_file_digest(f) for f in files if f]).encode()).hexdigest()
    return _code_digests[key]


def code_signature(code) -> str:
    """A digest of what a code object executes (nested code objects included)."""

    def parts(c):
        consts = tuple(parts(k) if isinstance(k, types.CodeType) else repr(k) for k in c.co_consts)
        return (c.co_code, c.co_names, c.co_varnames, c.co_freevars, c.co_cellvars, c.co_flags, c.co_firstlineno, c.co_filename, consts)

    return hashlib.sha256(repr(parts(code)).encode()).hexdigest()


def text_digest(lines: list) -> str:
    return hashlib.sha256("".join(lines).encode("utf-8", "surrogatepass")).hexdigest()


def entry_key(*fields: str) -> str:
    return "\n".join([sys.implementation.cache_tag or "none", *fields])


class CodeCache:
    """get/put of (fingerprint, reason, factory code) by key; a disabled cache misses and stores nothing."""

    def __init__(self, directory: str | None):
        self.directory = os.path.join(directory, sys.implementation.cache_tag or "none") if directory else None

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(key.encode()).hexdigest() + ".bin")

    def get(self, key: str):
        """(fingerprint, reason, code) or None. Never raises."""
        if self.directory is None:
            return None
        try:
            with open(self._path(key), "rb") as f:
                data = f.read()
            if not data.startswith(MAGIC):
                return None
            stored_key, fingerprint, reason, code = marshal.loads(data[len(MAGIC):])
        except Exception:  # missing, unreadable, truncated, corrupt, another layout
            return None
        if stored_key != key or not isinstance(code, types.CodeType) or not isinstance(fingerprint, str) or not isinstance(reason, str):
            return None
        return fingerprint, reason, code

    def put(self, key: str, fingerprint: str, reason: str, code) -> bool:
        """Store atomically; False (and nothing written) where the directory is not writable."""
        if self.directory is None:
            return False
        path = self._path(key)
        temporary = f"{path}.{os.getpid()}.{id(code):x}.tmp"
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(temporary, "wb") as f:
                f.write(MAGIC + marshal.dumps((key, fingerprint, reason, code)))
            os.replace(temporary, path)
            return True
        except Exception:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            return False
