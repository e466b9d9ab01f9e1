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


def test_the_tested_fingerprints_apply_reads_are_the_matrixs():
    """apply() reads compat/tested.json, not the whole matrix; the scanner writes both."""
    import json

    from sgl_accel.compat import TESTED_PATH, tested_index

    assert json.loads(TESTED_PATH.read_text()) == tested_index(load_matrix()), "tested.json is stale: run make compat"


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


def _benefit_releases(names):
    from sgl_accel.compat import BENEFIT_STATES

    matrix = load_matrix()
    return [r for r in matrix["releases"] if all(matrix["matrix"][r][n]["state"] in BENEFIT_STATES for n in names)]


def _covered(requirement, releases):
    from packaging.specifiers import SpecifierSet

    assert requirement.startswith("sglang>="), requirement
    spec = SpecifierSet(requirement[len("sglang"):])
    return [r for r in releases if r in spec]


def test_pin_covers_exactly_the_releases_where_every_named_patch_gives_its_benefit():
    matrix = load_matrix()
    for name in all_patches():
        proc = _cli("pin", name)
        good = _benefit_releases([name])
        if not good:
            assert proc.returncode == 1 and "no sglang release" in proc.stderr
            continue
        assert proc.returncode == 0, proc.stderr
        assert _covered(proc.stdout.strip(), matrix["releases"]) == good


def test_pin_for_a_hardware_names_every_release_its_users_can_stay_on():
    """--hardware ascend: the releases where each (non-opt-in) Ascend patch is applied,
    upstream, replaced or not needed; not only those where every patch is upstream."""
    matrix = load_matrix()
    ascend = [n for n, p in all_patches().items() if "ascend" in p.hardware and not p.opt_in]
    good = _benefit_releases(ascend)
    proc = _cli("pin", "--hardware", "ascend")
    assert proc.returncode == 0, proc.stderr
    assert _covered(proc.stdout.strip(), matrix["releases"]) == good
    # Releases that sgl-accel patches count, as do those that already have a change (upstream).
    # (No release has every Ascend change upstream: ascend-cp-padding's block-table part is not.)
    assert any(matrix["matrix"][r][n]["state"] == "applies" for r in good for n in ascend)
    assert any(matrix["matrix"][r][n]["state"] == "upstream" for r in good for n in ascend)


def test_pin_for_rocm_does_not_depend_on_what_this_machine_has_installed():
    """pin plans for the named hardware: nsa-decode-cat-skip (gfx95 with aiter) counts for
    rocm:gfx950 whether or not aiter is importable where pin runs (it is not, here)."""
    probe = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('aiter'))"], capture_output=True, text=True)
    assert probe.stdout.strip() == "None"  # where pin runs: the case the planning must not depend on
    rocm = [n for n, p in all_patches().items() if "rocm" in p.hardware and not p.opt_in]
    assert "nsa-decode-cat-skip" in rocm
    proc = _cli("pin", "--hardware", "rocm:gfx950", "--explain")
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith("    nsa-decode-cat-skip: applies") for line in proc.stdout.splitlines()), proc.stdout
    assert _covered(proc.stdout.strip().splitlines()[-1], load_matrix()["releases"]) == _benefit_releases(rocm)


def test_pin_explain_gives_each_release_and_patch_a_reason():
    matrix = load_matrix()
    proc = _cli("pin", "--hardware", "ascend", "--explain")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ascend = [n for n, p in all_patches().items() if "ascend" in p.hardware and not p.opt_in]
    good = set(_benefit_releases(ascend))
    for release in matrix["releases"]:
        assert f"{release}: {'yes' if release in good else 'no'}" in lines, release
    for name in ascend:
        explained = [l for l in lines if l.startswith(f"    {name}: ")]
        assert len(explained) == len(matrix["releases"])
        assert all(".py" in l for l in explained), name
    assert lines[-1] == proc.stdout.strip().splitlines()[-1] and lines[-1].startswith("sglang>=")


def test_pin_counts_an_opt_in_patch_only_when_named():
    import dataclasses

    from sgl_accel._registry import register_extra, unregister_extra
    from sgl_accel._detect import parse_hardware
    from sgl_accel.compat.query import pin

    base = pin(None, parse_hardware("ascend"))
    ascend_patch = next(p for p in all_patches().values() if "ascend" in p.hardware and not p.opt_in)
    extra = dataclasses.replace(ascend_patch, name="test-opt-in-ascend", opt_in=True)
    register_extra(extra)
    try:
        unnamed = pin(None, parse_hardware("ascend"))
        assert extra.name not in unnamed.names
        assert unnamed.requirement == base.requirement
        # Named, it counts: the matrix has no cell for it, so no release gives its benefit.
        named = pin([extra.name], parse_hardware("ascend"))
        assert named.names == [extra.name] and named.requirement == ""
    finally:
        unregister_extra(extra.name)


def test_pin_constraints_file(tmp_path):
    out = tmp_path / "constraints.txt"
    proc = _cli("pin", "--hardware", "ascend", "--format", "constraints", "-o", str(out))
    if proc.returncode == 0:
        lines = out.read_text().splitlines()
        assert lines[0].startswith("# sgl-accel") and lines[-1].startswith("sglang")
    else:
        assert "no sglang release" in proc.stderr


# --------------------------------------------------------------------------- every cell true


def test_every_state_in_the_matrix_has_a_reason():
    """Each cell and each target seen has a known state and a one-line reason; each cell's
    reason names a file it looked at; the README legend explains every state."""
    from sgl_accel.compat import STATE_MEANING
    from sgl_accel.compat.table import SYMBOL

    matrix = load_matrix()
    used = set()
    for release in matrix["releases"]:
        for name, entry in matrix["matrix"][release].items():
            where = (release, name)
            assert entry["state"] in STATE_MEANING, where
            used.add(entry["state"])
            assert entry["reason"].strip() and "\n" not in entry["reason"], where
            assert "sglang/srt/" in entry["reason"] and ".py" in entry["reason"], where
            for key, target in entry["targets"].items():
                assert target["state"] in STATE_MEANING, (where, key)
                assert target["reason"].strip() and target["file"].endswith(".py"), (where, key)
    assert set(SYMBOL) == set(STATE_MEANING)
    legend = readme_table(ROOT / "README.md")
    for state in used:
        assert f"`{SYMBOL[state]}`: {STATE_MEANING[state]}" in legend, state


def test_plan_gives_every_cell_its_reason_in_one_line():
    """plan --sglang X: per patch the cell's state leads a one-line reason naming the file
    and function looked at (on the patch's own hardware)."""
    from sgl_accel._detect import parse_hardware
    from sgl_accel.compat.query import plan_release

    matrix = load_matrix()
    hardware = {"ascend": parse_hardware("ascend"), "rocm": parse_hardware("rocm:gfx950"), "cuda": parse_hardware("cuda")}
    for release in matrix["releases"]:
        for name, entry in matrix["matrix"][release].items():
            patch = all_patches()[name]
            hw = hardware[patch.hardware[0]]
            if patch.hardware_check is not None and patch.hardware_check(hw):
                continue  # decided by a hardware detail (e.g. aiter), not by the release
            report = plan_release(release, hw)[name]
            assert "\n" not in report.reason
            assert entry["reason"] in report.reason, (release, name)
            if entry["state"] != "applies":
                assert report.reason.startswith(f"{entry['state']}: "), (release, name, report.reason)


@pytest.mark.sglang
@pytest.mark.parametrize("hardware_name", ["ascend", "rocm:gfx950", "cuda"])
def test_plan_from_the_matrix_agrees_with_status_on_the_installed_release(sglang_release, hardware_name):
    """plan --sglang X (decide over the matrix row of X) and status (decide over the installed
    source of X) reach the same state for every patch, part and target on each hardware.
    Kernels are not judged on either side: the matrix cannot know the machine's kernels."""
    from sgl_accel._decide import decide
    from sgl_accel._detect import parse_hardware, sglang_install
    from sgl_accel._plan import plan_patch, source_context
    from sgl_accel.compat.query import decide_release, plan_release

    install = sglang_install()
    assert install.version == str(sglang_release)
    hardware = parse_hardware(hardware_name)
    planned = plan_release(install.version, hardware)
    for name, patch in all_patches().items():
        live = decide(patch, source_context(install.location, install.version, hardware, check_kernels=False))
        from_matrix = decide_release(patch, install.version, hardware)
        assert from_matrix.state == live.state, (name, from_matrix.reason, live.reason)
        assert [(p.name, p.state) for p in from_matrix.parts] == [(p.name, p.state) for p in live.parts], name
        assert [(t.target.key, t.state) for t in from_matrix.targets] == [(t.target.key, t.state) for t in live.targets], name
        assert planned[name].state == plan_patch(patch, install.location, install.version, hardware, check_kernels=False).state, name


# --------------------------------------------------------------------------- the scanner


def _scanner(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGL_ACCEL")}
    return subprocess.run([sys.executable, "-m", "sgl_accel.compat.scanner", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_scanner_fails_with_one_line_when_the_index_cannot_be_reached(tmp_path):
    before = MATRIX_PATH.stat().st_mtime_ns
    url = "http://127.0.0.1:9/simple"  # the discard port: nothing listens there
    proc = _scanner("--index-url", url, "--cache", str(tmp_path / "cache"), "--readme", str(tmp_path / "README.md"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"sgl-accel compat: cannot reach the package index {url}"), lines[0]
    assert MATRIX_PATH.stat().st_mtime_ns == before


def _fake_wheel(path: Path, members: dict) -> Path:
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def test_scanner_resumes_from_the_wheel_cache(tmp_path):
    """Cached wheels are used as they are (no index contacted); a truncated one is dropped
    and downloaded again, and a failed download says so in one line."""
    from sgl_accel.compat.scanner import ScanError, cached_releases, fetch_wheels

    cache = tmp_path / "cache"
    good = _fake_wheel(cache / "wheels" / "sglang-0.5.11-py3-none-any.whl", {"sglang/__init__.py": ""})
    unreachable = "http://127.0.0.1:9/simple"
    assert fetch_wheels(["0.5.11"], cache, unreachable) == {"0.5.11": good}
    broken = cache / "wheels" / "sglang-0.5.12-py3-none-any.whl"
    broken.write_bytes(b"PK\x03\x04 truncated")
    assert cached_releases(cache) == ["0.5.11", "0.5.12"]
    with pytest.raises(ScanError) as info:
        fetch_wheels(["0.5.11", "0.5.12"], cache, unreachable)
    assert "downloading sglang 0.5.12 failed" in str(info.value) and "\n" not in str(info.value)
    assert not broken.exists() and good.exists()


def test_unpack_targets_extracts_what_the_patches_and_markers_read(tmp_path):
    """The wheel extraction covers target modules, moved places, gate modules and the
    modules that SourceCheck markers read (e.g. arg_groups/choices.py)."""
    from sgl_accel.compat.scanner import _target_files, unpack_targets

    wanted = _target_files()
    assert "sglang/srt/arg_groups/choices.py" in wanted
    assert "sglang/srt/speculative/dflash_worker_v2.py" in wanted
    assert "sglang/srt/models/deepseek_common/attention_forward_methods/forward_mla_rocm.py" in wanted
    wheel = _fake_wheel(tmp_path / "w.whl", {"sglang/srt/arg_groups/choices.py": "X = 1\n", "sglang/srt/other.py": ""})
    root = unpack_targets(wheel, tmp_path / "out")
    assert (root / "srt/arg_groups/choices.py").is_file() and not (root / "srt/other.py").exists()
