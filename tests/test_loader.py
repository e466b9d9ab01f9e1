"""The loader's machinery on a small module written by the test (no sglang needed):
orders of import/apply/revert, identity on revert, atomicity, threads, the guard.
Real sglang code is exercised in test_loader_sglang.py."""

import importlib
import sys
import textwrap
import threading
import uuid

import pytest

import sgl_accel
from sgl_accel import _loader, _rewrite
from sgl_accel._detect import SglangInstall
from sgl_accel._registry import Part, Patch, Target, register_extra, unregister_extra
from sgl_accel._rewrite import Rule

DEMO = textwrap.dedent(
    '''
    import math
    from os import path as ospath

    class Base:
        def run(self, x):
            return x

    class Model(Base):
        def run(self, x):
            """Run.

            The indentation of this docstring is part of its value.
            """
            y = super().run(x)

            if x is None:
                raise ValueError("line-number probe")
            # Method calls on import-bound names compile differently (LOAD_ATTR).
            y = math.floor(y) + len(ospath.join("a", "b")) - 3
            return y + 1

        @classmethod
        def make(cls, n):
            return [cls] * n

    def scale(v: int) -> int:
        return v * 2
    '''
)


@pytest.fixture
def demo(tmp_path, monkeypatch, accel):
    """A fresh module (not yet imported) and a registered two-part patch on it."""
    name = f"sgl_accel_demo_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(DEMO)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_loader, "_sglang_info", lambda: SglangInstall("0.5.11", str(tmp_path)))
    accel("cpu")
    # The demo module is not in the compatibility matrix (test_untested_source_is_skipped).
    monkeypatch.setenv("SGL_ACCEL_ALLOW_UNTESTED", "1")
    patch = Patch(
        name="demo-patch",
        upstream_pr="#1",
        kind="fix",
        summary="demo",
        hardware=("cpu",),
        releases=">=0.5.10",
        parts=[
            Part(
                "main",
                [
                    Target(name, "Model.run", rules=[Rule("plus two", "y + 1", "_sgl_accel_bump(y)")], upstream=["y + 2"]),
                    Target(name, "Model.make", rules=[Rule("one more", "[cls] * n", "[cls] * (n + 1)")]),
                    Target(name, "scale", rules=[Rule("triple", "v * 2", "v * 3")]),
                ],
            )
        ],
        helpers=lambda: {"_sgl_accel_bump": lambda y: y + 2},
    )
    register_extra(patch)
    yield name
    unregister_extra("demo-patch")
    sys.modules.pop(name, None)


def _originals(module):
    return {k: module.Model.__dict__[k] for k in ("run", "make")} | {"scale": module.__dict__["scale"]}


def _is_patched(module):
    return module.Model().run(1) == 3 and module.Model.make(1) == [module.Model] * 2 and module.scale(1) == 3


def _is_original(module):
    return module.Model().run(1) == 2 and module.Model.make(1) == [module.Model] and module.scale(1) == 2


def test_import_then_apply_then_revert_restores_identity(demo):
    module = importlib.import_module(demo)
    before = _originals(module)
    report = sgl_accel.apply(["demo-patch"])
    assert report["demo-patch"].state == "applied", report["demo-patch"].reason
    assert _is_patched(module)
    assert isinstance(module.Model.__dict__["make"], classmethod)
    assert module.Model.run.__qualname__ == "Model.run"
    sgl_accel.revert(["demo-patch"])
    assert _originals(module) == before and all(_originals(module)[k] is v for k, v in before.items())
    assert _is_original(module)


def test_apply_then_import_patches_on_import(demo):
    report = sgl_accel.apply(["demo-patch"])
    assert report["demo-patch"].state == "pending-import"
    module = importlib.import_module(demo)
    assert sgl_accel.status(["demo-patch"])["demo-patch"].state == "applied"
    assert _is_patched(module)


def test_apply_twice_patches_once_and_revert_twice_is_harmless(demo):
    module = importlib.import_module(demo)
    before = _originals(module)
    sgl_accel.apply(["demo-patch"])
    patched = _originals(module)
    sgl_accel.apply(["demo-patch"])
    assert all(_originals(module)[k] is v for k, v in patched.items())
    assert module.Model.run.__sgl_accel_original__ is before["run"]
    assert _is_patched(module)  # +2 once, not twice
    sgl_accel.revert(["demo-patch"])
    sgl_accel.revert(["demo-patch"])
    assert all(_originals(module)[k] is v for k, v in before.items())


def test_revert_without_apply_and_apply_after_revert(demo):
    module = importlib.import_module(demo)
    before = _originals(module)
    assert sgl_accel.revert(["demo-patch"])["demo-patch"].state == "skipped"
    assert all(_originals(module)[k] is v for k, v in before.items())
    sgl_accel.apply(["demo-patch"])
    sgl_accel.revert(["demo-patch"])
    assert sgl_accel.apply(["demo-patch"])["demo-patch"].state == "applied"
    assert _is_patched(module)


def test_revert_of_pending_patch_stops_the_import_hook(demo):
    sgl_accel.apply(["demo-patch"])
    sgl_accel.revert(["demo-patch"])
    module = importlib.import_module(demo)
    assert _is_original(module)


def test_eight_threads_patch_each_target_once(demo, monkeypatch):
    module = importlib.import_module(demo)
    before = _originals(module)
    builds = []
    real_build = _loader.build
    monkeypatch.setattr(_loader, "build", lambda *a: builds.append(a[0].target.key) or real_build(*a))
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        sgl_accel.apply(["demo-patch"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(builds) == sorted(t.key for t in sgl_accel._registry.all_patches()["demo-patch"].targets)
    assert module.Model.run.__sgl_accel_original__ is before["run"]
    assert _is_patched(module)


def test_failure_half_way_restores_every_original(demo, monkeypatch):
    module = importlib.import_module(demo)
    before = _originals(module)
    real_setattr = setattr
    calls = []

    def flaky_setattr(owner, attr, value):
        calls.append(attr)
        if len(calls) == 2:
            raise RuntimeError("simulated failure on the second target")
        real_setattr(owner, attr, value)

    monkeypatch.setattr(_loader, "setattr", flaky_setattr, raising=False)
    report = sgl_accel.apply(["demo-patch"])
    monkeypatch.undo()
    assert report["demo-patch"].state == "failed"
    assert "simulated failure" in report["demo-patch"].reason
    assert all(_originals(module)[k] is v for k, v in before.items())
    assert _is_original(module)


def test_guard_rejects_one_statement_difference(demo, tmp_path):
    (tmp_path / f"{demo}.py").write_text(DEMO.replace("return y + 1", "y = y * 1\n        return y + 1"))
    module = importlib.import_module(demo)
    report = sgl_accel.apply(["demo-patch"])
    assert report["demo-patch"].state == "applied"  # an extra statement elsewhere is fine for this rule...
    sgl_accel.revert(["demo-patch"])
    (tmp_path / f"{demo}.py").write_text(DEMO.replace("return y + 1", "return y + 1 if y else y + 1"))
    sys.modules.pop(demo)
    importlib.invalidate_caches()
    module = importlib.import_module(demo)
    report = sgl_accel.apply(["demo-patch"])
    assert report["demo-patch"].state == "skipped"
    assert "matched 2 site(s), expected 1" in report["demo-patch"].reason
    assert _is_original(module)


def test_source_changed_on_disk_after_import_is_not_patched(demo, tmp_path):
    module = importlib.import_module(demo)
    (tmp_path / f"{demo}.py").write_text(DEMO.replace("return y + 1", "return y + 1  # edited").replace("return x", "return x * 1"))
    import linecache

    linecache.checkcache()
    (tmp_path / f"{demo}.py").write_text(DEMO.replace("y = super().run(x)", "y = super().run(x) * 1"))
    linecache.checkcache()
    report = sgl_accel.apply(["demo-patch"])
    assert report["demo-patch"].state == "skipped"
    assert "differs from its source file" in report["demo-patch"].reason
    assert _is_original(module)


def _write_pyc(path) -> None:
    import py_compile

    py_compile.compile(str(path), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)


def test_a_valid_byte_code_cache_is_the_proof_and_the_def_is_not_compiled(demo, tmp_path, monkeypatch):
    _write_pyc(tmp_path / f"{demo}.py")
    module = importlib.import_module(demo)

    def no_compile(*args, **kwargs):
        raise AssertionError("the def was compiled though its byte-code cache is valid")

    monkeypatch.setattr(_loader, "def_code_from_text", no_compile)
    report = sgl_accel.apply(["demo-patch"])
    assert report["demo-patch"].state == "applied", report["demo-patch"].reason
    assert _is_patched(module)


def test_a_byte_code_cache_does_not_vouch_for_other_code_in_memory(demo, tmp_path):
    _write_pyc(tmp_path / f"{demo}.py")
    module = importlib.import_module(demo)
    # Same name, same lines, other body: code swapped in memory after import.
    other = {}
    exec(compile(DEMO.replace("if x is None:", "if x is None or x == 5:"), str(tmp_path / f"{demo}.py"), "exec"), other)
    module.Model.run.__code__ = other["Model"].run.__code__
    report = sgl_accel.apply(["demo-patch"])
    assert report["demo-patch"].state == "skipped"
    assert "differs from its source file" in report["demo-patch"].reason
    assert module.Model.run.__code__ is other["Model"].run.__code__


def test_a_stale_byte_code_cache_is_no_proof(demo, tmp_path, monkeypatch):
    """A cache written for an earlier version of the file is not read: the def is compiled."""
    source = tmp_path / f"{demo}.py"
    source.write_text(DEMO.replace("return v * 2", "return v * 2  # an older version, one line longer\n"))
    _write_pyc(source)
    source.write_text(DEMO)
    module = importlib.import_module(demo)
    compiled = []
    monkeypatch.setattr(_loader, "def_code_from_text", lambda *a, **k: compiled.append(a[3]) or _rewrite.def_code_from_text(*a, **k))
    report = sgl_accel.apply(["demo-patch"])
    assert report["demo-patch"].state == "applied", report["demo-patch"].reason
    assert sorted(compiled) == ["make", "run", "scale"]
    assert _is_patched(module)


def test_upstream_marker_leaves_target_alone(demo, tmp_path):
    (tmp_path / f"{demo}.py").write_text(DEMO.replace("return y + 1", "return y + 2").replace("[cls] * n", "[cls] * (n + 1)").replace("v * 2", "v * 3"))
    module = importlib.import_module(demo)
    report = sgl_accel.apply(["demo-patch"])
    # One target carries the marker, the others drifted: never half-applied.
    assert report["demo-patch"].state in ("skipped", "upstream")
    assert module.Model.__dict__["run"].__code__.co_filename.endswith(f"{demo}.py")
    assert not hasattr(module.Model.__dict__["run"], "__sgl_accel_patch__")


def test_gates_and_force(demo, accel, monkeypatch):
    importlib.import_module(demo)
    accel("rocm:gfx942")
    report = sgl_accel.apply(["demo-patch"])
    assert report["demo-patch"].state == "not-applicable" and "needs cpu" in report["demo-patch"].reason
    assert sgl_accel.apply(["demo-patch"], force=True)["demo-patch"].state == "applied"
    sgl_accel.revert(["demo-patch"])
    monkeypatch.setattr(_loader, "_sglang_info", lambda: SglangInstall("0.5.9", "/x"))
    assert "outside >=0.5.10" in sgl_accel.apply(["demo-patch"])["demo-patch"].reason


def test_dev_and_local_versions_are_judged_as_their_release(demo, monkeypatch):
    importlib.import_module(demo)
    monkeypatch.setattr(_loader, "_sglang_info", lambda: SglangInstall("0.5.12.post1.dev3+g1234abc", "/x"))
    assert sgl_accel.apply(["demo-patch"])["demo-patch"].state == "applied"


def test_unknown_names_raise_with_the_valid_list(demo):
    with pytest.raises(ValueError, match="valid names: .*demo-patch"):
        sgl_accel.apply(["no-such-patch"])


def test_report_prints_as_table_and_json(demo):
    importlib.import_module(demo)
    report = sgl_accel.apply(["demo-patch"])
    assert "demo-patch" in report.table() and "applied" in report.table()
    import json

    data = json.loads(report.to_json())
    assert data["patches"][0]["state"] == "applied" and data["patches"][0]["targets"][0]["fingerprint"]
    assert report.summary().startswith("sgl-accel ") and "applied 1/1" in report.summary()


def test_untested_source_is_skipped_with_its_fingerprint(demo, monkeypatch):
    module = importlib.import_module(demo)
    monkeypatch.delenv("SGL_ACCEL_ALLOW_UNTESTED")
    report = sgl_accel.apply(["demo-patch"])
    assert report["demo-patch"].state == "skipped"
    assert "untested source (Model.run fingerprint " in report["demo-patch"].reason
    assert _is_original(module)
    assert sgl_accel.apply(["demo-patch"], allow_untested=True)["demo-patch"].state == "applied"


def test_patched_function_reports_original_line_numbers(demo):
    module = importlib.import_module(demo)
    probe_line = DEMO.splitlines().index('            raise ValueError("line-number probe")') + 1
    sgl_accel.apply(["demo-patch"])
    assert module.Model.run.__sgl_accel_patch__ == "demo-patch"
    import traceback

    try:
        module.Model().run(None)
    except ValueError as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
    assert frame.filename.endswith(f"{demo}.py") and frame.lineno == probe_line


def test_patched_function_keeps_the_target_modules_future_flags(demo):
    # The demo module has no "from __future__ import annotations" (sgl_accel's own modules do).
    module = importlib.import_module(demo)
    sgl_accel.apply(["demo-patch"])
    assert module.scale.__sgl_accel_patch__ == "demo-patch"
    assert module.scale.__annotations__ == {"v": int, "return": int}


def test_opt_in_patch_applies_only_when_named(demo, monkeypatch):
    from dataclasses import replace

    from sgl_accel import _config
    from sgl_accel._registry import all_patches, default_names

    opt_in = replace(all_patches()["demo-patch"], name="demo-opt-in", opt_in=True)
    register_extra(opt_in)
    try:
        assert "demo-opt-in" not in default_names()
        monkeypatch.setenv("SGL_ACCEL", "1")
        assert "demo-opt-in" not in _config.read(default_on=False).patches
        monkeypatch.setenv("SGL_ACCEL", "demo-opt-in")
        assert _config.read(default_on=False).patches == ("demo-opt-in",)
        module = importlib.import_module(demo)
        report = sgl_accel.apply()
        assert "demo-opt-in" not in report.states() and report["demo-patch"].state == "applied"
        sgl_accel.revert(["demo-patch"])
        assert _is_original(module)
        report = sgl_accel.apply(["demo-opt-in"])
        assert report["demo-opt-in"].state == "applied"
        assert _is_patched(module)
        # status says which patches are opt-in (table and JSON).
        status = sgl_accel.status(["demo-opt-in", "demo-patch"])
        assert status["demo-opt-in"].opt_in and not status["demo-patch"].opt_in
        assert "fix opt-in" in str(status) and '"opt_in": true' in status.to_json()
    finally:
        sgl_accel.revert(["demo-opt-in"])
        unregister_extra("demo-opt-in")


def test_from_import_copies_follow_apply_and_revert(demo, tmp_path):
    """``from demo import scale`` (also under another name) in an sglang module gets the patched
    function, in one pass for the whole apply(); revert puts the originals back in every copy."""
    user = f"sglang_demo_user_{uuid.uuid4().hex[:8]}"  # the copies looked for are in sglang's modules
    (tmp_path / f"{user}.py").write_text(f"from {demo} import scale\nfrom {demo} import scale as double\n")
    module = importlib.import_module(demo)
    copies = importlib.import_module(user)
    try:
        original = module.scale
        sgl_accel.apply(["demo-patch"])
        assert copies.scale is module.scale is copies.double and copies.scale(1) == 3
        sgl_accel.revert(["demo-patch"])
        assert copies.scale is original and copies.double is original
    finally:
        sys.modules.pop(user, None)
