"""Activation from the environment: at start-up (the .pth line, SGL_ACCEL on) and from
sglang's plugin loader. Both may run in one process: each bad value is warned about
once and one INFO summary line is logged per process.

Imported at start-up: nothing here imports more than ``_config``, ``_index`` and
``_hooks`` until a target module is imported.
"""

from . import _config

_announced = False


def _warn(settings) -> None:
    blocking = settings.patches is None and any(not p.startswith("SGL_ACCEL_LOG_LEVEL") for p in settings.problems)
    for problem in settings.problems:
        suffix = "; no patch applied" if blocking and not problem.startswith("SGL_ACCEL_LOG_LEVEL") else ""
        _config.say_once("WARNING", problem + suffix)


def at_startup() -> None:
    """Validate, then wait (a meta-path finder) for the first import of a module a wanted patch targets."""
    settings = _config.read(default_on=False)
    _warn(settings)
    if settings.patches is None:
        return
    from ._hooks import when_imported
    from ._index import PATCHES

    global _waiting
    _waiting = True
    modules = sorted({m for name in settings.patches if name in PATCHES for m in PATCHES[name][1]})
    for module in modules:
        when_imported(module, _on_first_target_import)


_waiting = False  # start-up installed its finder and nothing has activated yet


def _on_first_target_import(module) -> None:
    ensure_active()


def ensure_active() -> None:
    """Start-up activation now, if it is still waiting (a first target import, or the
    process calls apply()/status()/revert() itself)."""
    global _waiting
    if _waiting:
        _waiting = False
        activate(_config.read(default_on=False), "start-up")


def from_plugin() -> None:
    settings = _config.read(default_on=True)
    _warn(settings)
    if settings.patches is not None:
        activate(settings, "sglang plugin")


def activate(settings, origin: str) -> None:
    """Apply the selected patches now (targets not imported yet: on import). Never raises."""
    global _announced
    import logging

    logger = logging.getLogger("sgl_accel")
    try:
        silence_sglang_rename_warning()
        configure_logging(settings.log_level)
        from ._loader import apply

        report = apply(list(settings.patches), allow_untested=settings.allow_untested, disabled=settings.disabled, announce=False)
        if not _announced:
            _announced = True
            logger.info("%s (%s)", report.summary(), origin)
    except Exception as exc:  # never stop Python or sglang from starting
        _config.say_once("WARNING", f"{origin} activation failed, no patch applied: {type(exc).__name__}: {exc}")


def configure_logging(level) -> None:
    if not level:
        return
    import logging

    logger = logging.getLogger("sgl_accel")
    logger.setLevel(level)
    if not any(getattr(h, "_sgl_accel", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        # The process id tells apart the lines of sglang's processes (engine, scheduler, detokenizer).
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
        handler._sgl_accel = True
        logger.addHandler(handler)
        logger.propagate = False


def silence_sglang_rename_warning() -> None:
    """sglang's environ module treats every SGL_* variable as a deprecated spelling of
    SGLANG_* and warns once per process; SGL_ACCEL* are ours, not sglang's. (The .pth line
    installs the same filter before anything runs; this covers installs without it.)"""
    import warnings

    warnings.filterwarnings("ignore", message=r"Environment variable SGL_ACCEL\w* is deprecated")
