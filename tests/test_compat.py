"""The compatibility matrix: produced by the scanner, consistent with the installed
releases, answered by plan/pin, and rendered in the README."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgl_accel._registry import all_patches
from sgl_accel.compat import MATRIX_PATH, load_matrix
from sgl_accel.compat.table import readme_table, render

ROOT = Path(__file__).resolve().parents[1]


def test_matrix_covers_every_patch_and_release_range():
    matrix = load_matrix()
    assert matrix["generated_by"] == "python -m sgl_accel.compat.scanner"
    assert matrix["patches"] == list(all_patches())
    assert matrix["releases"][0] == "0.5.3.post3"
    for release in matrix["releases"]:
        assert set(matrix["matrix"][release]) == set(all_patches()), release


def test_readme_table_is_generated_from_the_matrix():
    assert readme_table(ROOT / "README.md") == render(load_matrix()), "README table is stale: run make compat"


@pytest.mark.sglang
def test_rescanning_the_installed_release_matches_the_shipped_matrix(sglang_release):
    """The scanner over the release installed for this test pass gives the shipped row."""
    from sgl_accel._detect import sglang_install
    from sgl_accel.compat.scanner import scan_tree

    install = sglang_install()
    assert install.version == str(sglang_release)
    assert scan_tree(install.location, install.version) == load_matrix()["matrix"][install.version]


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGL_ACCEL")}
    return subprocess.run([sys.executable, "-m", "sgl_accel", *args], capture_output=True, text=True, env=env, timeout=120)


def test_plan_for_a_release_answers_from_the_matrix():
    matrix = load_matrix()
    release = matrix["releases"][-1]
    proc = _cli("plan", "--sglang", release, "--hardware", "ascend", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    states = {p["name"]: p["state"] for p in data["patches"]}
    for name, entry in matrix["matrix"][release].items():
        patch = all_patches()[name]
        if "ascend" not in patch.hardware:
            assert states[name] == "not-applicable"
        elif entry["state"] in ("applies", "upstream"):
            assert states[name] == entry["state"]
    assert _cli("plan", "--sglang", "0.0.1").returncode == 1


def test_pin_covers_exactly_the_releases_where_every_named_patch_applies_or_is_upstream():
    from packaging.specifiers import SpecifierSet

    matrix = load_matrix()
    for name in all_patches():
        proc = _cli("pin", name)
        good = [r for r in matrix["releases"] if matrix["matrix"][r][name]["state"] in ("applies", "upstream")]
        if not good:
            assert proc.returncode == 1
            continue
        assert proc.returncode == 0, proc.stderr
        requirement = proc.stdout.strip()
        assert requirement.startswith("sglang>=")
        spec = SpecifierSet(requirement[len("sglang"):])
        assert [r for r in matrix["releases"] if r in spec] == good, requirement


def test_pin_constraints_file(tmp_path):
    out = tmp_path / "constraints.txt"
    proc = _cli("pin", "--hardware", "ascend", "--format", "constraints", "-o", str(out))
    if proc.returncode == 0:
        lines = out.read_text().splitlines()
        assert lines[0].startswith("# sgl-accel") and lines[-1].startswith("sglang")
    else:
        assert "no sglang release" in proc.stderr
