"""Detect the installed sglang and the hardware, without importing sglang.

sglang's version comes from package metadata (wheel, editable or --target
installs), or, for a bare source tree on sys.path, from ``sglang/version.py``
read as text. Hardware detection imports torch (and torch_npu on Ascend), so it
runs only when asked: at apply time once sglang (hence torch) is loaded, or from
the CLI. ``SGL_ACCEL_HARDWARE`` overrides it for dry runs and tests.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ._config import HARDWARE_VALUES, SettingError, hardware_problem  # noqa: F401 (SettingError: re-exported)

HARDWARE_ENV = "SGL_ACCEL_HARDWARE"


@dataclass(frozen=True)
class SglangInstall:
    version: Optional[str]  # None: not installed
    location: Optional[str] = None  # the sglang package directory
    editable: bool = False
    source: str = "metadata"  # metadata | version.py | none
    problem: Optional[str] = None  # why the metadata could not be read (detection degraded)

    @property
    def installed(self) -> bool:
        return self.location is not None

    def describe(self) -> str:
        if not self.installed:
            return "sglang not installed"
        text = f"sglang {self.version or '(unknown version)'}"
        text += " (editable)" if self.editable else ""
        return text + (f" ({self.problem})" if self.problem else "")


def sglang_install() -> SglangInstall:
    spec = importlib.util.find_spec("sglang")  # a top-level find_spec imports nothing
    if spec is None or not spec.submodule_search_locations:
        return SglangInstall(version=None, source="none")
    location = str(Path(list(spec.submodule_search_locations)[0]).resolve())
    try:
        beside = _dist_info_beside(location)
        if beside is not None:
            return beside
        dist = _distribution_for(location)
        if dist is not None:
            return SglangInstall(version=dist.version, location=location, editable=_is_editable(dist))
        problem = None
    except Exception as exc:  # a broken dist-info must not break detection
        problem = f"sglang metadata unreadable: {type(exc).__name__}: {exc}"
    return SglangInstall(version=_version_from_source(location), location=location, source="version.py", problem=problem)


def _dist_info_beside(location: str):
    """The common case, read without importlib.metadata (which costs ~20 ms to import):
    exactly one sglang-*.dist-info next to the package (wheel and --target installs)."""
    parent = Path(location).parent
    try:
        infos = [n for n in os.listdir(parent) if n.startswith("sglang-") and n.endswith(".dist-info")]
    except OSError:
        return None
    if len(infos) != 1:
        return None
    try:
        with open(parent / infos[0] / "METADATA", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Version:"):
                    version = line.split(":", 1)[1].strip()
                    break
                if not line.strip():
                    return None
            else:
                return None
        direct = parent / infos[0] / "direct_url.json"
        editable = _editable_in(direct.read_text()) if direct.exists() else False
    except (OSError, ValueError):
        return None
    return SglangInstall(version=version, location=location, editable=editable)


def _distribution_for(location: str):
    from importlib import metadata

    try:
        dist = metadata.distribution("sglang")
    except metadata.PackageNotFoundError:
        return None
    # The metadata found must belong to the sglang that imports: a stale
    # dist-info elsewhere on sys.path would lie about the version.
    if _is_editable(dist):
        return dist
    try:
        base = Path(dist.locate_file("sglang")).resolve()
    except Exception:
        return dist
    return dist if str(base) == location else None


def _is_editable(dist) -> bool:
    try:
        return _editable_in(dist.read_text("direct_url.json") or "")
    except Exception:
        return False


def _editable_in(direct_url: str) -> bool:
    """PEP 610 direct_url.json says editable (anything malformed: not editable)."""
    try:
        data = json.loads(direct_url)
    except ValueError:
        return False
    info = data.get("dir_info") if isinstance(data, dict) else None
    return isinstance(info, dict) and bool(info.get("editable"))


def _version_from_source(location: str) -> Optional[str]:
    path = Path(location) / "version.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return node.value.value
    return None


@dataclass(frozen=True)
class Hardware:
    kind: str  # ascend | rocm | cuda | cpu
    arch: Optional[str] = None  # ascend SoC name, gfx arch, or CUDA "sm90"
    details: dict = field(default_factory=dict)
    overridden: bool = False

    def describe(self) -> str:
        text = self.kind + (f" {self.arch}" if self.arch else "")
        return text + (" (SGL_ACCEL_HARDWARE)" if self.overridden else "")


def parse_hardware(value: str) -> Hardware:
    problem = hardware_problem(value)
    if problem:
        raise SettingError(problem)
    kind, _, arch = value.strip().lower().partition(":")
    details = {}
    if kind == "rocm":
        details["aiter"] = importlib.util.find_spec("aiter") is not None
    return Hardware(kind=kind, arch=arch or None, details=details, overridden=True)


def fleet_hardware(value: str) -> Hardware:
    """``value`` as the machines a release is chosen for (``pin``): what this machine has
    installed says nothing about them, so the libraries a patch gates on (aiter) count as there."""
    hardware = parse_hardware(value)
    if hardware.kind == "rocm":
        hardware.details["aiter"] = True
    return hardware


def hardware_override() -> Optional[Hardware]:
    """SGL_ACCEL_HARDWARE as read by _config; SettingError for a bad value."""
    from ._config import read

    settings = read()
    bad = [p for p in settings.problems if p.startswith(HARDWARE_ENV)]
    if bad:
        raise SettingError(bad[0])
    return parse_hardware(settings.hardware) if settings.hardware else None


def detect_hardware() -> Hardware:
    """Probe the machine. Imports torch (and torch_npu where installed)."""
    override = hardware_override()
    if override is not None:
        return override
    ascend = _detect_ascend()
    if ascend is not None:
        return ascend
    import torch

    if getattr(torch.version, "hip", None):
        details = {"hip": torch.version.hip, "aiter": importlib.util.find_spec("aiter") is not None}
        arch = None
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            # gcnArchName looks like "gfx942:sramecc+:xnack-".
            arch = torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]
        return Hardware(kind="rocm", arch=arch, details=details)
    if torch.version.cuda and torch.cuda.is_available() and torch.cuda.device_count() > 0:
        major, minor = torch.cuda.get_device_capability(0)
        return Hardware(kind="cuda", arch=f"sm{major}{minor}", details={"cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)})
    return Hardware(kind="cpu")


def _detect_ascend() -> Optional[Hardware]:
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        import torch
        import torch_npu

        if not (torch.npu.is_available() and torch.npu.device_count() > 0):
            return None
        soc = torch.npu.get_device_name(0)
        return Hardware(kind="ascend", arch=soc, details={"torch_npu": getattr(torch_npu, "__version__", "unknown")})
    except Exception:
        return None


def kernel_available(symbol: str) -> tuple[bool, str]:
    """Whether ``"package.module:attr"`` imports here; returns (ok, detail with the version found)."""
    module_name, _, attr = symbol.partition(":")
    try:
        module = importlib.import_module(module_name)
        obj = module
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except Exception as exc:  # ImportError, AttributeError, or a broken kernel package
        return False, f"{symbol} not importable ({type(exc).__name__}: {exc})"
    return True, f"{symbol} from {module_name.split('.')[0]} {package_version(module_name.split('.')[0])}"


def package_version(top_level: str) -> str:
    from importlib import metadata

    for name in (top_level, top_level.replace("_", "-")):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import sys

        return str(getattr(sys.modules.get(top_level), "__version__", "unknown version"))
    except Exception:
        return "unknown version"
