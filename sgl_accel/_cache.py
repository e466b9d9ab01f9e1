"""A persistent cache of rewritten code objects, so that apply() does not parse and compile again.

An entry holds the verdict of the structural guard for one target (state, reason,
fingerprint) and, for a target that applies, the compiled rewrite. It is keyed on
everything that determines them: the sgl-accel version, the stamps of its rewriting
modules and of the patch's module, the patch and target names, the target file's stamp
(path, size, modification time in ns, inode: as pytest keys its rewritten bytecode), the
signature of the live function's code (bytecode, names, constants, flags, file, first
line) and ``sys.implementation.cache_tag``. An "applies" entry is written only after the
function in memory was shown to be compiled from that file; a later process whose key
matches has the same file and the same function in memory, so that proof holds for it.

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


def sgl_accel_digest(patch_module_file: str | None) -> str:
    """The sgl-accel code that shapes a rewrite: its version and the stamps of the rewriting
    modules and of the patch module (stamps, not contents: see ``file_stamp``)."""
    from . import __version__

    here = os.path.dirname(__file__)
    files = tuple(os.path.join(here, name) for name in ("_rewrite.py", "_guard.py", "_decide.py")) + ((patch_module_file,) if patch_module_file else ())
    if files not in _code_digests:
        _code_digests[files] = hashlib.sha256("\0".join([__version__, *map(file_stamp, files)]).encode()).hexdigest()
    return _code_digests[files]


def code_signature(code) -> str:
    """A digest of what a code object executes (nested code objects included)."""

    def parts(c):
        consts = tuple(parts(k) if isinstance(k, types.CodeType) else repr(k) for k in c.co_consts)
        return (c.co_code, c.co_names, c.co_varnames, c.co_freevars, c.co_cellvars, c.co_flags, c.co_firstlineno, c.co_filename, consts)

    return hashlib.sha256(repr(parts(code)).encode()).hexdigest()


def file_stamp(path: str) -> str:
    """What identifies a file's contents without reading it ("" if it cannot be stat'ed)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def entry_key(*fields: str) -> str:
    return "\n".join([sys.implementation.cache_tag or "none", *fields])


class CodeCache:
    """get/put of (state, reason, fingerprint, factory code or None) by key; a disabled cache
    misses and stores nothing."""

    def __init__(self, directory: str | None):
        self.directory = os.path.join(directory, sys.implementation.cache_tag or "none") if directory else None

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(key.encode()).hexdigest() + ".bin")

    def get(self, key: str):
        """(state, reason, fingerprint, code or None), or None. Never raises."""
        if self.directory is None:
            return None
        try:
            with open(self._path(key), "rb") as f:
                data = f.read()
            if not data.startswith(MAGIC):
                return None
            stored_key, state, reason, fingerprint, code = marshal.loads(data[len(MAGIC):])
        except Exception:  # missing, unreadable, truncated, corrupt, another layout
            return None
        texts = all(isinstance(v, str) for v in (stored_key, state, reason, fingerprint))
        if stored_key != key or not texts or not (code is None or isinstance(code, types.CodeType)):
            return None
        return state, reason, fingerprint, code

    def put(self, key: str, state: str, reason: str, fingerprint: str, code=None) -> bool:
        """Store atomically; False (and nothing written) where the directory is not writable."""
        if self.directory is None:
            return False
        path = self._path(key)
        temporary = f"{path}.{os.getpid()}.{id(code):x}.tmp"
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(temporary, "wb") as f:
                f.write(MAGIC + marshal.dumps((key, str(state), reason, fingerprint, code)))
            os.replace(temporary, path)
            return True
        except Exception:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            return False
