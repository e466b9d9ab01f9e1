"""Every SGL_ACCEL* environment variable, read and validated here and nowhere else.

SGL_ACCEL            unset: off for start-up activation, on for the sglang plugin;
                     1/true/yes/on/all: every applicable patch (opt-in ones excepted);
                     0/false/no/off/none: none; name,name: only those patches.
SGL_ACCEL_DISABLE    name,name: never apply these.
SGL_ACCEL_HARDWARE   override hardware detection (HARDWARE_VALUES).
SGL_ACCEL_LOG_LEVEL  DEBUG/INFO/WARNING/ERROR/CRITICAL for the "sgl_accel" logger.
SGL_ACCEL_ALLOW_UNTESTED  boolean: also patch targets whose source the matrix has not seen.
SGL_ACCEL_VERIFY     boolean: run a patch's equivalence cases right after applying it.
SGL_ACCEL_CACHE      boolean (default on): keep rewritten code objects on disk.
SGL_ACCEL_CACHE_DIR  where (default $XDG_CACHE_HOME/sgl-accel or ~/.cache/sgl-accel).

Booleans take 1/0/true/false/yes/no/on/off in any case. A bad value gives one
warning naming the valid ones (``Settings.problems``) and, except for the log
level, no patch is applied: a misread setting never changes sglang.

Start-up reads this module in every process that has SGL_ACCEL set, so it imports
nothing but ``os`` and ``sys`` (no dataclasses, logging, re).
"""

import os
import sys

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
HARDWARE_KINDS = ("ascend", "rocm", "cuda", "cpu")
HARDWARE_VALUES = "ascend, ascend:<soc>, rocm, rocm:<gfx arch> (e.g. rocm:gfx950), cuda, cuda:<sm> (e.g. cuda:90), cpu"
BOOLEAN_VALUES = "1, 0, true, false, yes, no, on, off"


class SettingError(ValueError):
    """A bad value in one of the SGL_ACCEL* environment variables."""


class Settings:
    """The SGL_ACCEL* variables of one process, validated. Immutable.

    patches: names to apply, or None (nothing to do); disabled: names never applied;
    hardware: the validated SGL_ACCEL_HARDWARE text or None; problems: one message per bad value.
    """

    __slots__ = ("patches", "disabled", "hardware", "log_level", "allow_untested", "verify", "cache", "cache_dir", "problems")

    def __init__(self, **values):
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name, value):
        raise AttributeError("Settings are immutable")

    def __eq__(self, other):
        return isinstance(other, Settings) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self):
        return hash(tuple(getattr(self, n) for n in self.__slots__))

    def __repr__(self):
        return "Settings(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


def boolean(name: str, raw, default: bool, problems: list) -> bool:
    value = (raw or "").strip().lower()
    if not value:
        return default
    if value in ON or value in OFF:
        return value in ON
    problems.append(f"{name}={raw!r} is not valid; valid values: {BOOLEAN_VALUES}")
    return default


def hardware_problem(value: str):
    """None if ``value`` is a valid SGL_ACCEL_HARDWARE, else the message."""
    kind, _, arch = value.strip().lower().partition(":")
    if kind not in HARDWARE_KINDS or (kind == "cpu" and arch):
        return f"SGL_ACCEL_HARDWARE={value!r} is not valid; valid values: {HARDWARE_VALUES}"
    if kind == "rocm" and arch and not arch.startswith("gfx"):
        return f"SGL_ACCEL_HARDWARE={value!r}: a ROCm arch looks like gfx942 or gfx950; valid values: {HARDWARE_VALUES}"
    return None


def known_patches() -> dict:
    """name -> opt_in, from the generated index plus patches registered at run time (tests)."""
    from ._index import PATCHES

    known = {name: entry[0] for name, entry in PATCHES.items()}
    registry = sys.modules.get("sgl_accel._registry")
    if registry is not None:
        known.update({name: patch.opt_in for name, patch in registry.all_patches().items()})
    return known


def _names(variable: str, value: str, known: dict, problems: list):
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        problems.append(
            f"{variable}={value!r}: unknown patch name(s) {', '.join(unknown) or '(none given)'}; "
            f"valid values: 1, 0, or a comma-separated list of: {', '.join(known)}"
        )
        return None
    return tuple(dict.fromkeys(names))


def _selection(raw, default_on: bool, known: dict, problems: list):
    value = (raw or "").strip()
    if not value:
        on = default_on
    elif value.lower() in ON + ("all",) or value.lower() in OFF + ("none",):
        on = value.lower() in ON + ("all",)
    else:
        return _names("SGL_ACCEL", value, known, problems)
    return tuple(name for name, opt_in in known.items() if not opt_in) if on else None


def _log_level(raw, problems: list):
    level = (raw or "").strip().upper()
    if level and level not in LOG_LEVELS:
        problems.append(f"SGL_ACCEL_LOG_LEVEL={raw!r} is not valid; valid values: {', '.join(LOG_LEVELS)}")
        return None
    return level or None


def _cache_dir(environ) -> str:
    explicit = (environ.get("SGL_ACCEL_CACHE_DIR") or "").strip()
    if explicit:
        return explicit
    base = (environ.get("XDG_CACHE_HOME") or "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sgl-accel")


def read(environ=None, default_on: bool = False) -> Settings:
    """The settings of this environment (``os.environ`` by default). Never raises."""
    environ = os.environ if environ is None else environ
    problems: list = []
    known = known_patches()
    patches = _selection(environ.get("SGL_ACCEL"), default_on, known, problems)
    disabled_raw = (environ.get("SGL_ACCEL_DISABLE") or "").strip()
    disabled = _names("SGL_ACCEL_DISABLE", disabled_raw, known, problems) if disabled_raw else ()
    hardware = (environ.get("SGL_ACCEL_HARDWARE") or "").strip() or None
    bad_hardware = hardware_problem(hardware) if hardware else None
    if bad_hardware:
        problems.append(bad_hardware)
    values = dict(
        hardware=None if bad_hardware else hardware,
        log_level=_log_level(environ.get("SGL_ACCEL_LOG_LEVEL"), problems),
        allow_untested=boolean("SGL_ACCEL_ALLOW_UNTESTED", environ.get("SGL_ACCEL_ALLOW_UNTESTED"), False, problems),
        verify=boolean("SGL_ACCEL_VERIFY", environ.get("SGL_ACCEL_VERIFY"), False, problems),
        cache=boolean("SGL_ACCEL_CACHE", environ.get("SGL_ACCEL_CACHE"), True, problems),
        cache_dir=_cache_dir(environ),
    )
    # A misread setting must not change sglang: any bad value but the log level turns patching off.
    blocking = [p for p in problems if not p.startswith("SGL_ACCEL_LOG_LEVEL")]
    return Settings(patches=None if blocking else patches, disabled=disabled or (), problems=tuple(problems), **values)


# --------------------------------------------------------------------------- one message per process


def warn_problems(settings: Settings) -> None:
    """One warning per bad value (start-up and the plugin may both call this in one process);
    those that stop every patch say so."""
    blocking = settings.patches is None and any(not p.startswith("SGL_ACCEL_LOG_LEVEL") for p in settings.problems)
    for problem in settings.problems:
        suffix = "; no patch applied" if blocking and not problem.startswith("SGL_ACCEL_LOG_LEVEL") else ""
        say_once("WARNING", problem + suffix)


_said: set = set()


def say_once(level: str, message: str) -> bool:
    """Emit ``message`` once per process (start-up and the sglang plugin may both run).

    Through the "sgl_accel" logger when logging is already imported, else straight to
    stderr (start-up must not import logging for a warning). Returns whether it was emitted.
    """
    if message in _said:
        return False
    _said.add(message)
    if "logging" in sys.modules or level != "WARNING":
        import logging

        logging.getLogger("sgl_accel").log(getattr(logging, level), "sgl-accel: %s", message)
    else:
        # Same shape as the logger's lines: the process id tells sglang's processes apart.
        sys.stderr.write(f"WARNING sgl_accel[{os.getpid()}]: sgl-accel: {message}\n")
    return True
