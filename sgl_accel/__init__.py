"""sgl-accel: upstream sglang fixes and speed-ups for Ascend NPU and AMD ROCm,
applied to the sglang release you already run.

    import sgl_accel
    sgl_accel.apply()          # every patch whose gates hold; returns a Report
    print(sgl_accel.status())  # what is patched and why

Importing this package imports neither torch nor sglang.
"""

__version__ = "0.1.0"
__all__ = ["apply", "revert", "status", "patch_names", "__version__"]


def _start_up_first():
    """Start-up activation (SGL_ACCEL set) waits for a target import; a call here comes first."""
    import sys

    startup = sys.modules.get("sgl_accel._startup")
    if startup is not None:
        startup.ensure_active()


def apply(patches=None, *, force=False, allow_untested=False):
    """Apply the named patches (None: all applicable) and return a Report.

    Targets sglang has not imported yet are patched when it imports them.
    ``force=True`` skips the release, hardware and kernel gates, never the
    structural guard. Unknown names raise ValueError listing the valid ones.
    """
    from ._loader import apply as _apply

    _start_up_first()

    return _apply(patches, force=force, allow_untested=allow_untested)


def revert(patches=None):
    """Restore the original sglang objects of the named patches (None: all)."""
    from ._loader import revert as _revert

    _start_up_first()

    return _revert(patches)


def status(patches=None):
    """The Report of this process: per patch a state and a one-line reason."""
    from ._loader import status as _status

    _start_up_first()

    return _status(patches)


def patch_names():
    """The names of the patches sgl-accel ships."""
    from ._registry import all_patches

    return list(all_patches())
