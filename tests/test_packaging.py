"""The design card's layout survives packaging: patches/ and compat/ at the top of the
repository install as sgl_accel.patches and sgl_accel.compat (never as top-level modules),
with the start-up .pth, from a wheel, an sdist and an editable install, each in a fresh
virtual environment. Builds fetch hatchling from the package index (build isolation)."""

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, sys, sysconfig
from pathlib import Path
import sgl_accel.patches, sgl_accel.compat
from sgl_accel._registry import all_patches
site = Path(sysconfig.get_paths()["purelib"])
print(json.dumps({
    "patches": sorted(all_patches()),
    "matrix": all(Path(sgl_accel.compat.__file__).with_name(n).is_file() for n in ("matrix.json", "tested.json")),
    "top_level": [str(importlib.util.find_spec(n).origin) for n in ("patches", "compat") if importlib.util.find_spec(n) is not None],
    "site_top": sorted(p.name for p in site.iterdir() if p.name in ("patches", "compat")),
    "pth": (site / "sgl_accel_startup.pth").is_file(),
}))
"""


def _venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)
    return path / "bin" / "python"


def _run(*args, cwd=None):
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _probe(python: Path, cwd: Path) -> dict:
    import json

    return json.loads(_run(str(python), "-c", PROBE, cwd=cwd).strip().splitlines()[-1])


def _expected():
    from sgl_accel._registry import all_patches

    return sorted(all_patches())


@pytest.mark.parametrize("form", ["wheel", "sdist", "editable"])
def test_layout_installs_inside_the_package(form, tmp_path):
    python = _venv(tmp_path / "venv")
    pip = [str(python), "-m", "pip", "install", "-q"]
    if form == "wheel":
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path / "dist"))
        _run(*pip, *map(str, (tmp_path / "dist").glob("sgl_accel-*.whl")))
    elif form == "sdist":
        _run(sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(tmp_path / "dist"), cwd=ROOT)
        _run(*pip, *map(str, (tmp_path / "dist").glob("sgl_accel-*.tar.gz")))
    else:
        _run(*pip, "-e", str(ROOT))
    result = _probe(python, tmp_path)
    assert result == {"patches": _expected(), "matrix": True, "top_level": [], "site_top": [], "pth": True}, result
