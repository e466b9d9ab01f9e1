"""Start-up activation, imported by sgl_accel_startup.pth only when SGL_ACCEL is on.

Every Python process that inherits SGL_ACCEL (sglang's scheduler, TP workers,
detokenizer, tokenizer workers, but also pip and health checks) runs this, so it
only validates the settings (one warning per bad value) and installs a small
meta-path finder for the modules the wanted patches target (read from the
generated ``_index``). It imports ``_config``, ``_hooks`` and ``_index``, nothing
else: the loader, ``_activate``, logging, ``packaging``, ``ast`` are imported the
first time one of those modules is imported (or the process calls apply()). Python
3.15+ (PEP 829): the .pth ``import`` line is to move to a ``sgl_accel.start`` file
naming this module once that mechanism ships; the behaviour stays the same.
"""

from . import _config

_waiting = False  # the finder is installed and nothing has activated yet


def at_startup() -> None:
    """Validate, then wait (a meta-path finder) for the first import of a module a wanted patch targets."""
    global _waiting
    settings = _config.read(default_on=False)
    _config.warn_problems(settings)
    if settings.patches is None:
        return
    from ._hooks import when_imported
    from ._index import PATCHES

    _waiting = True
    modules = sorted({m for name in settings.patches if name in PATCHES for m in PATCHES[name][1]})
    for module in modules:
        when_imported(module, _on_first_target_import)


def _on_first_target_import(module) -> None:
    ensure_active()


def ensure_active() -> None:
    """Start-up activation now, if it is still waiting (a first target import, or the
    process calls apply()/status()/revert() itself)."""
    global _waiting
    if _waiting:
        _waiting = False
        from ._activate import activate

        activate(_config.read(default_on=False), "start-up")


try:
    at_startup()
except Exception as _exc:  # never break interpreter start-up
    import sys as _sys

    _sys.stderr.write(f"sgl-accel: start-up activation failed, no patch applied: {_exc!r}\n")
