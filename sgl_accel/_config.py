"""The SGL_ACCEL* environment variables.

SGL_ACCEL            unset: off for start-up activation, on for the sglang plugin;
                     1/true/on/all: every applicable patch; 0/false/off: none;
                     name,name: only those patches.
SGL_ACCEL_DISABLE    name,name: never apply these.
SGL_ACCEL_HARDWARE   override hardware detection (see _detect.HARDWARE_VALUES).
SGL_ACCEL_LOG_LEVEL  DEBUG/INFO/WARNING/ERROR for the "sgl_accel" logger.
SGL_ACCEL_ALLOW_UNTESTED  1: also patch targets whose source the matrix has not seen.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

from ._detect import SettingError, hardware_override

ON = ("1", "true", "on", "yes", "all")
OFF = ("0", "false", "off", "no", "none")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Selection:
    patches: Optional[list]  # None: nothing to do; [] never returned; list of names
    disabled: tuple = ()
    allow_untested: bool = False


def _names(variable: str, value: str, known: list) -> list:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SettingError(
            f"{variable}={value!r}: unknown patch name(s) {', '.join(unknown) or '(none given)'}; "
            f"valid values: {', '.join(ON[:1] + OFF[:1])}, or a comma-separated list of: {', '.join(known)}"
        )
    return names


def selection(default_on: bool) -> Selection:
    """Read the environment. Raises SettingError with one clear message on a bad value."""
    from ._registry import all_patches, default_names

    known = list(all_patches())
    raw = os.environ.get("SGL_ACCEL")
    value = (raw or "").strip()
    if raw is None or value == "":
        patches = default_names() if default_on else None
    elif value.lower() in ON:
        patches = default_names()
    elif value.lower() in OFF:
        patches = None
    else:
        patches = _names("SGL_ACCEL", value, known)
    disabled_raw = os.environ.get("SGL_ACCEL_DISABLE", "").strip()
    disabled = tuple(_names("SGL_ACCEL_DISABLE", disabled_raw, known)) if disabled_raw else ()
    untested = os.environ.get("SGL_ACCEL_ALLOW_UNTESTED", "").strip().lower()
    if untested and untested not in ON + OFF:
        raise SettingError(f"SGL_ACCEL_ALLOW_UNTESTED={untested!r}: valid values: 1 or 0")
    hardware_override()  # validates SGL_ACCEL_HARDWARE early, with its own message
    return Selection(patches=patches, disabled=disabled, allow_untested=untested in ON)


def configure_logging() -> None:
    level = os.environ.get("SGL_ACCEL_LOG_LEVEL", "").strip().upper()
    if not level:
        return
    logger = logging.getLogger("sgl_accel")
    if level not in LOG_LEVELS:
        logger.warning("sgl-accel: SGL_ACCEL_LOG_LEVEL=%r is not valid; valid values: %s", level, ", ".join(LOG_LEVELS))
        return
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
    SGLANG_* and warns once per process; SGL_ACCEL* are ours, not sglang's."""
    import warnings

    warnings.filterwarnings("ignore", message=r"Environment variable SGL_ACCEL\w* is deprecated")


_activated_by: Optional[str] = None  # the activation that read SGL_ACCEL in this process


def activate_from_environment(default_on: bool, origin: str) -> None:
    """Shared by start-up activation and the sglang plugin. Never raises."""
    global _activated_by
    logger = logging.getLogger("sgl_accel")
    if _activated_by is not None:
        # sglang >= 0.5.11 engine and scheduler run both the .pth and the plugin:
        # one activation, one summary and at most one warning per process.
        logger.debug("sgl-accel: %s: already activated by %s in this process", origin, _activated_by)
        return
    if os.environ.get("SGL_ACCEL", "").strip():  # unset, the two origins decide differently
        _activated_by = origin
    try:
        silence_sglang_rename_warning()
        configure_logging()
        chosen = selection(default_on)
        if chosen.patches is None:
            return
        from ._loader import apply

        apply(chosen.patches, allow_untested=chosen.allow_untested, disabled=chosen.disabled)
    except SettingError as exc:
        logger.warning("sgl-accel: %s; no patch applied", exc)
    except Exception as exc:  # never stop Python or sglang from starting
        logger.warning("sgl-accel: %s activation failed, no patch applied: %s: %s", origin, type(exc).__name__, exc)
