"""Detection (sglang version from metadata, hardware override), import cost, and the CLI."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sgl_accel._detect import SettingError, parse_hardware


def _child(code, pythonpath=None, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGL_ACCEL")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath]))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def _fake_sglang(root, version, editable_source=None):
    """A minimal installed sglang: the package and its dist-info, no code that runs."""
    pkg_parent = editable_source or root
    (pkg_parent / "sglang").mkdir(parents=True, exist_ok=True)
    (pkg_parent / "sglang" / "__init__.py").write_text("raise RuntimeError('sglang must not be imported by detection')\n")
    info = root / f"sglang-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sglang\nVersion: {version}\n")
    if editable_source:
        (info / "direct_url.json").write_text(json.dumps({"url": f"file://{editable_source}", "dir_info": {"editable": True}}))
        (root / "__editable__.sglang.pth").write_text(str(editable_source) + "\n")


DETECT = "from sgl_accel._detect import sglang_install; import json, sys; i = sglang_install(); print(json.dumps([i.version, i.editable, i.source, any(m == 'sglang' for m in sys.modules)]))"


@pytest.mark.parametrize("version", ["0.5.11", "0.5.12.post1", "0.5.12.post1.dev3+g1234abc", "0.5.13rc1"])
def test_version_from_metadata_without_importing_sglang(tmp_path, version):
    _fake_sglang(tmp_path, version)
    proc = _child(DETECT, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [version, False, "metadata", False]


def test_editable_install_is_detected(tmp_path):
    site, src = tmp_path / "site", tmp_path / "checkout" / "python"
    site.mkdir()
    _fake_sglang(site, "0.5.12.post1.dev7+gabcdef0", editable_source=src)
    proc = _child("import site; site.addsitedir(%r); " % str(site) + DETECT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["0.5.12.post1.dev7+gabcdef0", True, "metadata", False]


def test_bare_source_tree_reads_version_py(tmp_path):
    (tmp_path / "sglang").mkdir()
    (tmp_path / "sglang" / "__init__.py").write_text("raise RuntimeError\n")
    (tmp_path / "sglang" / "version.py").write_text('__version__ = "0.5.12rc0"\n')
    proc = _child(DETECT, str(tmp_path))
    assert json.loads(proc.stdout) == ["0.5.12rc0", False, "version.py", False]


def test_no_sglang(tmp_path):
    proc = _child(DETECT, str(tmp_path))
    assert json.loads(proc.stdout)[0] is None


@pytest.mark.parametrize("value, kind, arch", [("ascend", "ascend", None), ("rocm:gfx950", "rocm", "gfx950"), ("ROCM", "rocm", None), ("cuda", "cuda", None), ("cpu", "cpu", None)])
def test_hardware_override_values(value, kind, arch):
    hw = parse_hardware(value)
    assert (hw.kind, hw.arch, hw.overridden) == (kind, arch, True)


@pytest.mark.parametrize("value", ["tpu", "rocm:mi300", "cpu:x86", ""])
def test_hardware_override_rejects_bad_values_naming_the_valid_ones(value):
    with pytest.raises(SettingError, match="valid values: ascend"):
        parse_hardware(value)


def test_import_sgl_accel_imports_neither_torch_nor_sglang():
    proc = _child("import sys, sgl_accel; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sglang', 'wrapt', 'packaging', 'inspect', 'ast')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_startup_hook_is_inert_without_the_variable():
    proc = _child("import sys; print('sgl_accel' in sys.modules, 'sgl_accel._startup' in sys.modules)")
    assert proc.stdout.strip() == "False False"


def _cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGL_ACCEL")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "sgl_accel", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_help_and_exit_codes():
    assert _cli("--help").returncode == 0
    assert "status" in _cli("--help").stdout
    assert _cli().returncode == 2
    bad = _cli("diff", "no-such-patch")
    assert bad.returncode == 2 and "valid names" in bad.stderr
    bad_hw = _cli("status", "--hardware", "tpu")
    assert bad_hw.returncode == 3 and "valid values" in bad_hw.stderr


def test_cli_list_json_names_every_patch():
    proc = _cli("list", "--json")
    assert proc.returncode == 0, proc.stderr
    from sgl_accel import patch_names

    assert [p["name"] for p in json.loads(proc.stdout)] == patch_names()
