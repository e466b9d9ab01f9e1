"""Wheel layout hook (hatchling).

The design card puts ``patches/`` and ``compat/`` at the top of the repository, so the
architecture shows in the first listing; they install inside the package as
``sgl_accel.patches`` and ``sgl_accel.compat``, never as top-level modules. In a source
tree (and so in an editable install, or a wheel built from the tree) the symlinks
``sgl_accel/patches`` and ``sgl_accel/compat`` give the same names; an sdist carries no
symlinks, so a wheel built from it gets the directories copied in.
(hatchling's ``sources`` rewrite would do this for wheels, but refuses editable installs.)
"""

from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

TOP_LEVEL_SUBPACKAGES = ("patches", "compat")


class LayoutHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if self.target_name == "wheel" and version == "standard":
            for name in TOP_LEVEL_SUBPACKAGES:
                if (Path(self.root) / "sgl_accel" / name).exists():
                    continue  # the symlink brings it in
                build_data["force_include"][name] = f"sgl_accel/{name}"
