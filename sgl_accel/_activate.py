"""Activation: apply the patches the settings select, once a process needs them (start-up's
first target import, see ``_startup``) or at once (sglang's plugin loader). Both may run
in one process: each bad value is warned about once and one INFO summary line is logged
per process. Start-up never imports this module before activation.
"""

from . import _config

_announced = False


def from_plugin() -> None:
    settings = _config.read(default_on=True)
    _config.warn_problems(settings)
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
