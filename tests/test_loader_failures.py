"""The twelve ways the loader misfired (issue 13.2), each closed; the generated index and
patch table in sync with the registry; the code-object cache (issue 14). Release-free:
the demo module of test_loader.py stands for sglang code."""

import functools
import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from test_loader import DEMO, _is_original, _is_patched, _originals, demo  # noqa: F401 (fixture)

import sgl_accel
from sgl_accel import _config, _loader
from sgl_accel._detect import SglangInstall

REAL_SGLANG_INFO = _loader._sglang_info
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGL_ACCEL")}
    env.update(extra)
    return env


def _child(code, **extra):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(**extra), timeout=300)


# --------------------------------------------------------------------------- 1. run-time wrappers


def test_1_a_runtime_wrapper_refuses_the_whole_patch_and_stays(demo):
    module = importlib.import_module(demo)
    inner = module.Model.__dict__["run"]

    @functools.wraps(inner)
    def wrapper(self, x):
        return inner(self, x) * 10

    module.Model.run = wrapper
    report = sgl_accel.apply(["demo-patch"])["demo-patch"]
    assert report.state == "skipped"
    assert "wrapped at run time by wrapper()" in report.reason
    assert module.Model.__dict__["run"] is wrapper and module.Model().run(1) == 20
    assert module.scale(1) == 2  # all or nothing: the other targets are not patched either
    assert not any(t.state == "applied" for t in report.targets)


def test_1_a_replacement_function_is_left_alone(demo):
    module = importlib.import_module(demo)
    module.scale = lambda v: v
    report = sgl_accel.apply(["demo-patch"])["demo-patch"]
    assert report.state == "skipped" and "replaced at run time" in report.reason


# --------------------------------------------------------------------------- 2. sglang importable later


def test_2_not_installed_is_not_remembered(demo, monkeypatch):
    importlib.import_module(demo)
    found = {"installed": False}
    location = os.path.dirname(sys.modules[demo].__file__)
    monkeypatch.setattr(_loader, "_sglang_info", REAL_SGLANG_INFO)  # the real detection path, not the fixture's
    monkeypatch.setattr(_loader, "sglang_install", lambda: SglangInstall("0.5.11", location) if found["installed"] else SglangInstall(None, source="none"))
    assert sgl_accel.apply(["demo-patch"])["demo-patch"].reason == "sglang is not installed"
    found["installed"] = True  # e.g. a script extended sys.path after start-up
    assert sgl_accel.apply(["demo-patch"])["demo-patch"].state == "applied"


# --------------------------------------------------------------------------- 3. import in progress


def test_3_apply_during_another_threads_import_lands_when_it_completes(demo, tmp_path):
    import builtins

    slow = f"{demo}_slow"
    (tmp_path / f"{slow}.py").write_text("import builtins\nbuiltins._sgl_accel_gate.wait(30)\n\n\ndef scale(v):\n    return v * 2\n")
    from dataclasses import replace

    from sgl_accel._registry import all_patches, register_extra, unregister_extra

    patch = all_patches()["demo-patch"]
    moved = [replace(part, targets=[replace(t, module=slow) for t in part.targets if t.qualname == "scale"]) for part in patch.parts]
    register_extra(replace(patch, name="demo-slow", parts=moved))
    builtins._sgl_accel_gate = threading.Event()
    try:
        importlib.import_module(demo)
        importer = threading.Thread(target=importlib.import_module, args=(slow,))
        importer.start()
        while slow not in sys.modules:
            time.sleep(0.01)
        assert sgl_accel.apply(["demo-slow"])["demo-slow"].state == "pending-import"
        builtins._sgl_accel_gate.set()
        importer.join(30)
        deadline = time.time() + 10
        while sgl_accel.status(["demo-slow"])["demo-slow"].state != "applied" and time.time() < deadline:
            time.sleep(0.02)
        assert sgl_accel.status(["demo-slow"])["demo-slow"].state == "applied"
        assert sys.modules[slow].scale(1) == 3
    finally:
        sgl_accel.revert(["demo-slow"])
        unregister_extra("demo-slow")
        sys.modules.pop(slow, None)
        del builtins._sgl_accel_gate


# --------------------------------------------------------------------------- 4. BaseException mid-swap


def test_4_keyboard_interrupt_during_the_swap_restores_every_target(demo, monkeypatch):
    module = importlib.import_module(demo)
    before = _originals(module)
    real_setattr, calls = setattr, []

    def interrupted(owner, attr, value):
        calls.append(attr)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_setattr(owner, attr, value)

    monkeypatch.setattr(_loader, "setattr", interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        sgl_accel.apply(["demo-patch"])
    monkeypatch.delattr(_loader, "setattr")
    assert all(_originals(module)[k] is v for k, v in before.items())
    assert sgl_accel.status(["demo-patch"])["demo-patch"].state == "failed"
    assert sgl_accel.apply(["demo-patch"])["demo-patch"].state == "applied" and _is_patched(module)


# --------------------------------------------------------------------------- 5. revert failing half-way


def test_5_a_failing_revert_restores_the_rest_and_names_what_is_still_patched(demo, monkeypatch, caplog):
    module = importlib.import_module(demo)
    before = _originals(module)
    sgl_accel.apply(["demo-patch"])
    real_setattr = setattr

    def refuses_scale(owner, attr, value):
        if attr == "scale":
            raise RuntimeError("cannot set scale now")
        real_setattr(owner, attr, value)

    monkeypatch.setattr(_loader, "setattr", refuses_scale, raising=False)
    report = sgl_accel.revert(["demo-patch"])["demo-patch"]
    assert report.state == "failed" and report.reason.endswith(f"still patched: {demo}:scale")
    assert {t.target: t.state for t in report.targets}[f"{demo}:scale"] == "applied"
    assert module.Model.__dict__["run"] is before["run"] and module.scale(1) == 3
    monkeypatch.delattr(_loader, "setattr")
    with caplog.at_level(logging.WARNING, logger="sgl_accel"):
        assert sgl_accel.revert(["demo-patch"])["demo-patch"].state == "skipped"
    assert "replaced by other code" not in caplog.text
    assert all(_originals(module)[k] is v for k, v in before.items())


# --------------------------------------------------------------------------- 6. reload


def test_6_reload_reapplies_on_the_new_objects(demo):
    module = importlib.import_module(demo)
    sgl_accel.apply(["demo-patch"])
    module = importlib.reload(module)
    state = sgl_accel.status(["demo-patch"])["demo-patch"].state
    assert state == "applied"
    assert getattr(module.Model.__dict__["run"], "__sgl_accel_patch__", None) == "demo-patch" and _is_patched(module)


def test_6_status_never_claims_objects_that_lost_the_patch(demo):
    module = importlib.import_module(demo)
    sgl_accel.apply(["demo-patch"])
    fresh = {}
    exec(compile(DEMO, module.__file__, "exec"), fresh)
    module.Model = fresh["Model"]  # what a reload outside the import system leaves behind
    report = sgl_accel.status(["demo-patch"])["demo-patch"]
    assert report.state != "applied" and "no longer in effect" in report.reason


# --------------------------------------------------------------------------- 7. re-patched by another library


def test_7_revert_leaves_another_librarys_function_and_a_later_apply_decides_afresh(demo, caplog):
    module = importlib.import_module(demo)
    before = _originals(module)
    sgl_accel.apply(["demo-patch"])

    def theirs(v):
        return -v

    module.scale = theirs
    with caplog.at_level(logging.WARNING, logger="sgl_accel"):
        report = sgl_accel.revert(["demo-patch"])["demo-patch"]
    assert report.state == "skipped" and f"left to other code: {demo}:scale" in report.reason
    assert {t.target: t.state for t in report.targets}[f"{demo}:scale"] == "overwritten"
    assert module.scale is theirs and module.Model.__dict__["run"] is before["run"]
    again = sgl_accel.apply(["demo-patch"])["demo-patch"]
    assert again.state == "skipped" and "replaced at run time" in again.reason


# --------------------------------------------------------------------------- 8. CLI on bad input


@pytest.mark.parametrize("where", ["missing-dir/out.txt", "."])
def test_8_pin_to_an_unwritable_place_is_one_line_and_exit_2(tmp_path, where):
    proc = subprocess.run([sys.executable, "-m", "sgl_accel", "pin", "-o", str(tmp_path / where)], capture_output=True, text=True, env=_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot write" in proc.stderr


@pytest.mark.parametrize("device", ["cuda:7", "tpu"])
def test_8_bench_on_an_unavailable_device_says_so(device):
    proc = subprocess.run([sys.executable, "-m", "sgl_accel", "bench", "--device", device, "--no-loader"], capture_output=True, text=True, env=_env())
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and device in proc.stderr


# --------------------------------------------------------------------------- 9. broken dist-info


@pytest.mark.parametrize("direct_url, metadata", [("[]", None), ('{"dir_info": null}', None), ('"x"', None), (None, b"Name: sglang\nVersion: 0.5.11\nSummary: \xff\xfe\n")])
def test_9_a_broken_dist_info_degrades_detection(tmp_path, direct_url, metadata):
    (tmp_path / "sglang").mkdir()
    (tmp_path / "sglang" / "__init__.py").write_text("")
    (tmp_path / "sglang" / "version.py").write_text('__version__ = "0.5.11"\n')
    info = tmp_path / "sglang-0.5.11.dist-info"
    info.mkdir()
    (info / "METADATA").write_bytes(metadata or b"Metadata-Version: 2.1\nName: sglang\nVersion: 0.5.11\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(direct_url)
    code = "import sgl_accel; r = sgl_accel.apply(); print(r.sglang)"
    proc = _child(code, PYTHONPATH=str(tmp_path), SGL_ACCEL_HARDWARE="cpu")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "0.5.11" in proc.stdout
    assert len([line for line in proc.stderr.splitlines() if "sgl-accel" in line]) <= 1
    status = subprocess.run([sys.executable, "-m", "sgl_accel", "status", "--hardware", "cpu"], capture_output=True, text=True, env=_env(PYTHONPATH=str(tmp_path)))
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr


# --------------------------------------------------------------------------- 10. SGL_ACCEL_VERIFY


@pytest.mark.parametrize("value, on", [("true", True), ("YES", True), ("on", True), ("1", True), ("off", False), ("0", False), ("", False)])
def test_10_verify_takes_the_boolean_vocabulary(value, on):
    settings = _config.read({"SGL_ACCEL": "1", "SGL_ACCEL_VERIFY": value})
    assert settings.verify is on and not settings.problems


def test_10_a_bad_verify_value_is_one_warning_naming_the_valid_ones():
    settings = _config.read({"SGL_ACCEL": "1", "SGL_ACCEL_VERIFY": "maybe"})
    assert settings.patches is None
    (problem,) = settings.problems
    assert "SGL_ACCEL_VERIFY='maybe'" in problem and "true" in problem and "off" in problem


def test_settings_are_immutable():
    settings = _config.read({})
    with pytest.raises(AttributeError):
        settings.patches = ("x",)


# --------------------------------------------------------------------------- 11. one warning, one summary


def test_11_start_up_and_plugin_in_one_process_warn_once():
    code = "from sgl_accel.plugin import load; load(); load(); import sgl_accel; sgl_accel.status()"
    proc = _child(code, SGL_ACCEL="1", SGL_ACCEL_DISABLE="nope")
    lines = [line for line in proc.stderr.splitlines() if "sgl-accel" in line]
    assert len(lines) == 1 and "nope" in lines[0], proc.stderr


def test_11_start_up_and_plugin_in_one_process_log_one_summary():
    code = "from sgl_accel.plugin import load; load(); import sgl_accel; sgl_accel.status(); load()"
    proc = _child(code, SGL_ACCEL="1", SGL_ACCEL_LOG_LEVEL="INFO", SGL_ACCEL_HARDWARE="cpu")
    summaries = [line for line in proc.stderr.splitlines() if ": applied " in line]
    assert len(summaries) == 1, proc.stderr


def test_11_the_pth_line_silences_warnings_about_our_variables_even_when_off():
    code = "import warnings; warnings.warn('Environment variable SGL_ACCEL_LOG_LEVEL is deprecated, please use SGLANG_ACCEL_LOG_LEVEL'); warnings.warn('Environment variable SGL_OTHER is deprecated')"
    proc = _child(code, SGL_ACCEL="0", SGL_ACCEL_LOG_LEVEL="INFO")
    assert "SGL_ACCEL" not in proc.stderr and "SGL_OTHER" in proc.stderr


# --------------------------------------------------------------------------- 12 and issue 14: lazy start-up

PROBE = "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('sgl_accel', 'logging', 'dataclasses', 'packaging', 'inspect', 'ast', 'importlib.util')))"


@pytest.mark.parametrize("value", [None, "0", "off"])
def test_12_off_imports_nothing_at_start_up(value):
    proc = _child(PROBE, **({"SGL_ACCEL": value} if value is not None else {}))
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_on_without_sglang_imports_only_the_start_up_modules():
    proc = _child(PROBE, SGL_ACCEL="1")
    found = set(json.loads(proc.stdout.replace("'", '"')))
    assert found <= {"sgl_accel", "sgl_accel._startup", "sgl_accel._config", "sgl_accel._index", "sgl_accel._hooks"}, found


def test_a_bad_value_still_warns_at_start_up():
    proc = _child("pass", SGL_ACCEL="bogus")
    assert "SGL_ACCEL='bogus'" in proc.stderr and "valid values" in proc.stderr


def test_index_and_patch_table_are_generated_from_the_registry():
    from sgl_accel import _registry

    with open(os.path.join(ROOT, "sgl_accel", "_index.py")) as f:
        assert f.read() == _registry.index_source(), "stale: run python -m sgl_accel._registry"
    with open(os.path.join(ROOT, "README.md")) as f:
        assert _registry.readme_patch_table(f.read()) == _registry.patch_table(), "stale: run python -m sgl_accel._registry"


# --------------------------------------------------------------------------- issue 14: the code-object cache


@pytest.fixture
def compiles(monkeypatch, tmp_path):
    """Counts factory compilations; the cache lives in tmp_path/cache."""
    monkeypatch.setenv("SGL_ACCEL_CACHE_DIR", str(tmp_path / "cache"))
    count = []
    real = _loader.factory_code
    monkeypatch.setattr(_loader, "factory_code", lambda *a, **k: count.append(1) or real(*a, **k))
    return count


def _apply_fresh(module_name):
    _loader._reset_for_tests()
    report = sgl_accel.apply(["demo-patch"])["demo-patch"]
    return report, sys.modules[module_name]


def _entries(tmp_path):
    return sorted((tmp_path / "cache").rglob("*.bin"))


def test_cache_warm_apply_compiles_nothing_and_patches_the_same(demo, compiles, tmp_path):
    importlib.import_module(demo)
    report, module = _apply_fresh(demo)
    assert report.state == "applied" and len(compiles) == 3 and len(_entries(tmp_path)) == 3
    compiles.clear()
    report, module = _apply_fresh(demo)
    assert report.state == "applied" and compiles == [] and _is_patched(module)
    assert report.targets[0].fingerprint  # the cached verdict keeps the fingerprint


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "empty", "stale"])
def test_cache_a_damaged_entry_is_ignored(demo, compiles, tmp_path, damage):
    importlib.import_module(demo)
    _apply_fresh(demo)
    entries = _entries(tmp_path)
    contents = [path.read_bytes() for path in entries]
    for i, (path, data) in enumerate(zip(entries, contents)):
        if damage == "stale":  # a valid entry, but another key's
            path.write_bytes(contents[(i + 1) % len(contents)])
        else:
            path.write_bytes({"corrupt": b"\x00garbage" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    compiles.clear()
    report, module = _apply_fresh(demo)
    assert report.state == "applied" and _is_patched(module)
    assert len(compiles) == 3


def test_cache_off_and_read_only_directory(demo, compiles, tmp_path, monkeypatch):
    importlib.import_module(demo)
    monkeypatch.setenv("SGL_ACCEL_CACHE", "0")
    report, module = _apply_fresh(demo)
    assert report.state == "applied" and _entries(tmp_path) == []
    monkeypatch.delenv("SGL_ACCEL_CACHE")
    monkeypatch.setenv("SGL_ACCEL_CACHE_DIR", "/proc/sgl-accel-cannot-be-here")
    report, module = _apply_fresh(demo)
    assert report.state == "applied" and _is_patched(module)


def test_cache_a_changed_target_source_misses(demo, compiles, tmp_path):
    importlib.import_module(demo)
    _apply_fresh(demo)
    _loader._reset_for_tests()
    (tmp_path / f"{demo}.py").write_text(DEMO.replace("return v * 2", "return v * 2  # changed"))
    sys.modules.pop(demo)
    importlib.invalidate_caches()
    importlib.import_module(demo)
    compiles.clear()
    report, module = _apply_fresh(demo)
    assert report.state == "applied" and len(compiles) == 3 and _is_patched(module)


CONCURRENT = textwrap.dedent(
    """
    import importlib, json, sys
    sys.path.insert(0, sys.argv[1])
    from sgl_accel import _loader
    from sgl_accel._detect import SglangInstall
    from sgl_accel._registry import Part, Patch, Target, register_extra
    from sgl_accel._rewrite import Rule
    _loader._sglang_info = lambda: SglangInstall("0.5.11", sys.argv[1])
    register_extra(Patch(name="demo-patch", upstream_pr="#1", kind="fix", summary="demo", hardware=("cpu",),
        parts=[Part("main", [Target("demo_shared", "scale", rules=[Rule("triple", "v * 2", "v * 3")])])]))
    module = importlib.import_module("demo_shared")
    import sgl_accel
    state = sgl_accel.apply(["demo-patch"])["demo-patch"].state
    print(json.dumps([state, module.scale(1)]))
    """
)


def test_cache_two_processes_filling_an_empty_cache_at_once(tmp_path):
    (tmp_path / "demo_shared.py").write_text(DEMO)
    env = _env(SGL_ACCEL_CACHE_DIR=str(tmp_path / "cache"), SGL_ACCEL_HARDWARE="cpu", SGL_ACCEL_ALLOW_UNTESTED="1")
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for out, err in outs:
        assert json.loads(out.strip().splitlines()[-1]) == ["applied", 3], err
    again = subprocess.run([sys.executable, "-c", CONCURRENT, str(tmp_path)], capture_output=True, text=True, env=env)
    assert json.loads(again.stdout.strip().splitlines()[-1]) == ["applied", 3], again.stderr
    assert len(list((tmp_path / "cache").rglob("*.bin"))) == 1 and not list((tmp_path / "cache").rglob("*.tmp"))
