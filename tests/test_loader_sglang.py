"""The loader against real sglang code, each scenario in a fresh interpreter.

A test-only patch rewrites the real ``SamplingParams.verify`` of the release
under test so that a NaN temperature is rejected (the original's
``temperature < 0.0`` lets NaN through). Start-up activation, the sglang plugin
and bad settings run in subprocesses, as they would in sglang's workers.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# The machinery does not depend on the release; these subprocess scenarios cost
# about 15 s each, so they run against one release with the plugin mechanism and
# the upstream control release.
LOADER_RELEASES = ("0.5.11", "0.5.13.post1")
pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(os.environ.get("SGL_ACCEL_TEST_SGLANG") not in LOADER_RELEASES, reason="loader scenarios run on " + ", ".join(LOADER_RELEASES)),
]

PRELUDE = textwrap.dedent(
    """
    import json, math, sys
    from sgl_accel.testing import standins
    standins.activate()
    import sgl_accel
    from sgl_accel._registry import Patch, Part, Target, register_extra
    from sgl_accel._rewrite import Rule
    MODULE = "sglang.srt.sampling.sampling_params"
    register_extra(Patch(
        name="test-nan-temperature", upstream_pr="(test only)", kind="fix",
        summary="reject NaN temperature", hardware=("cpu",),
        parts=[Part("main", [Target(MODULE, "SamplingParams.verify",
            rules=[Rule("NaN check", "self.temperature < 0.0",
                        "not self.temperature >= 0.0")],
            upstream=["math.isnan(self.temperature)"])])],
    ))

    def rejects_nan():
        from sglang.srt.sampling.sampling_params import SamplingParams
        try:
            SamplingParams(temperature=float("nan")).verify(100)
        except ValueError:
            return True
        return False

    def verify_obj():
        from sglang.srt.sampling.sampling_params import SamplingParams
        return SamplingParams.__dict__["verify"]
    """
)


def run_child(body: str, env_extra=None, expect_ok=True):
    env = dict(os.environ)
    env.pop("SGL_ACCEL", None)
    env["SGL_ACCEL_HARDWARE"] = "cpu"
    # The test-only patch's target is not in the compatibility matrix.
    env["SGL_ACCEL_ALLOW_UNTESTED"] = "1"
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, env=env, timeout=300)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def child_json(body: str, env_extra=None):
    proc = run_child(PRELUDE + textwrap.dedent(body), env_extra)
    return json.loads(proc.stdout.strip().splitlines()[-1])


ORDERS = {
    "import-then-apply": """
        orig = verify_obj(); r = sgl_accel.apply(["test-nan-temperature"])
        out = dict(state=r["test-nan-temperature"].state, patched=rejects_nan())
        sgl_accel.revert(["test-nan-temperature"])
        out.update(restored=verify_obj() is orig, after=rejects_nan())
    """,
    "apply-then-import": """
        r = sgl_accel.apply(["test-nan-temperature"]); first = r["test-nan-temperature"].state
        orig_state = first
        out = dict(pending=first, patched=rejects_nan(), state=sgl_accel.status()["test-nan-temperature"].state)
        orig = verify_obj().__sgl_accel_original__
        sgl_accel.revert(["test-nan-temperature"])
        out.update(restored=verify_obj() is orig, after=rejects_nan())
    """,
    "apply-twice-revert-twice": """
        orig = verify_obj()
        sgl_accel.apply(["test-nan-temperature"]); once = verify_obj()
        r = sgl_accel.apply(["test-nan-temperature"])
        out = dict(state=r["test-nan-temperature"].state, same=verify_obj() is once,
                   chain=verify_obj().__sgl_accel_original__ is orig, patched=rejects_nan())
        sgl_accel.revert(["test-nan-temperature"]); sgl_accel.revert(["test-nan-temperature"])
        out.update(restored=verify_obj() is orig, after=rejects_nan())
    """,
    "revert-without-apply-then-apply-after-revert": """
        orig = verify_obj()
        sgl_accel.revert(["test-nan-temperature"])
        untouched = verify_obj() is orig
        sgl_accel.apply(["test-nan-temperature"]); sgl_accel.revert(["test-nan-temperature"])
        r = sgl_accel.apply(["test-nan-temperature"])
        out = dict(untouched=untouched, state=r["test-nan-temperature"].state, patched=rejects_nan())
        sgl_accel.revert(["test-nan-temperature"])
        out.update(restored=verify_obj() is orig, after=rejects_nan())
    """,
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_orders_of_import_apply_revert_on_real_sglang(order):
    body = textwrap.dedent(ORDERS[order]) + "\nprint(json.dumps(out))\n"
    if order == "apply-then-import":
        out = child_json(body)
        assert out["pending"] == "pending-import"
    else:
        out = child_json("verify_obj()\n" + body)
    assert out["state"] == "applied"
    assert out["patched"] is True
    assert out["restored"] is True and out["after"] is False
    assert out.get("same", True) and out.get("chain", True) and out.get("untouched", True)


def test_original_lets_nan_through():
    out = child_json("print(json.dumps(dict(r=rejects_nan())))")
    assert out["r"] is False  # the bug the test-only patch fixes is real in this release


def test_patched_function_keeps_identity_of_file_lines_and_no_wrapper():
    out = child_json(
        """
        import inspect
        orig = verify_obj(); sgl_accel.apply(["test-nan-temperature"]); new = verify_obj()
        print(json.dumps(dict(file=new.__code__.co_filename == orig.__code__.co_filename,
            line=new.__code__.co_firstlineno == orig.__code__.co_firstlineno,
            qualname=new.__qualname__, module=new.__module__, wrapped=hasattr(new, "__wrapped__"),
            globals_same=new.__globals__ is orig.__globals__)))
        """
    )
    assert out == dict(file=True, line=True, qualname="SamplingParams.verify", module="sglang.srt.sampling.sampling_params", wrapped=False, globals_same=True)


def test_diff_shows_the_rewrite():
    out = child_json(
        """
        from sgl_accel._plan import diff_patch
        from sgl_accel._detect import sglang_install
        ok, text = diff_patch(sgl_accel._registry.all_patches()["test-nan-temperature"], sglang_install().location)
        print(json.dumps(dict(ok=ok, text=text)))
        """
    )
    assert out["ok"]
    changed = [l for l in out["text"].splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---")]
    assert [(l[0], l[1:].strip()) for l in changed] == [("-", "if self.temperature < 0.0:"), ("+", "if not self.temperature >= 0.0:")]


# --------------------------------------------------------------------------- start-up activation

STARTUP_CHILD = textwrap.dedent(
    """
    import json, sys
    import sgl_accel
    before = {n: p.state for n, p in zip(sgl_accel.patch_names(), sgl_accel.status())}
    from sgl_accel.testing import standins
    standins.activate()
    import importlib
    unimportable = []
    for name in sgl_accel.patch_names():
        for module in sgl_accel._loader.modules_of(sgl_accel._registry.all_patches()[name]):
            try:
                importlib.import_module(module)
            except ImportError:  # e.g. 0.5.13.post1's broken nsa_backend re-export shim
                unimportable.append(name)
    after = {p.name: p.state for p in sgl_accel.status()}
    print(json.dumps(dict(startup="sgl_accel._startup" in sys.modules, before=before, after=after, unimportable=unimportable)))
    """
)


def _startup_result(env):
    proc = run_child(STARTUP_CHILD, env)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _opt_in_names():
    """Patches SGL_ACCEL=1 and the plugin leave out by design (applied only when named)."""
    from sgl_accel._registry import all_patches

    return {name for name, patch in all_patches().items() if patch.opt_in}


def test_startup_activation_installs_hooks_in_a_fresh_interpreter():
    out, _ = _startup_result({"SGL_ACCEL": "1"})
    assert out["startup"] is True
    opt_in = _opt_in_names()
    for name, state in out["before"].items():
        assert state in (("skipped",) if name in opt_in else ("pending-import", "not-applicable")), (name, state)
    for name, state in out["after"].items():
        if name not in out["unimportable"] and name not in opt_in:
            assert state != "pending-import", (name, state)  # the import hook ran


def test_startup_does_nothing_without_the_variable():
    out, _ = _startup_result({})
    assert out["startup"] is False
    assert set(out["after"].values()) <= {"skipped"}


def test_startup_activation_reaches_spawned_children():
    body = textwrap.dedent(
        """
        import json, multiprocessing as mp

        def child(q):
            import sys, sgl_accel
            from sgl_accel._registry import default_names
            q.put(("sgl_accel._startup" in sys.modules, [p.state for p in sgl_accel.status(default_names())]))

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            q = ctx.Queue(); p = ctx.Process(target=child, args=(q,)); p.start()
            print(json.dumps(q.get(timeout=120))); p.join()
        """
    )
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(body)
    proc = subprocess.run([sys.executable, f.name], capture_output=True, text=True, timeout=300, env={**os.environ, "SGL_ACCEL": "1", "SGL_ACCEL_HARDWARE": "cpu"})
    assert proc.returncode == 0, proc.stderr
    started, states = json.loads(proc.stdout.strip().splitlines()[-1])
    assert started is True
    assert "skipped" not in states or not states  # every patch was requested in the child


@pytest.mark.parametrize(
    "env, bad",
    [
        ({"SGL_ACCEL": "bogus-patch"}, "bogus-patch"),
        ({"SGL_ACCEL": "1", "SGL_ACCEL_DISABLE": "nope"}, "nope"),
        ({"SGL_ACCEL": "1", "SGL_ACCEL_HARDWARE": "tpu"}, "tpu"),
    ],
)
def test_bad_settings_warn_once_and_python_still_starts(env, bad):
    proc = run_child("import sgl_accel; print(sorted({p.state for p in sgl_accel.status()}))", env)
    lines = [l for l in proc.stderr.splitlines() if "sgl-accel" in l]
    assert len(lines) == 1, proc.stderr
    assert bad in lines[0] and "valid" in lines[0]
    assert proc.stdout.strip() in ("['skipped']", "[]")  # nothing applied


def test_sglang_plugin_entry_point_through_real_load_plugins(sglang_release):
    from packaging.version import Version

    if sglang_release < Version("0.5.11"):
        pytest.skip("sglang < 0.5.11 has no plugin mechanism")
    proc = run_child(
        textwrap.dedent(
            """
            import json
            from sgl_accel.testing import standins
            standins.activate()
            from sglang.srt.plugins import load_plugins
            load_plugins()
            import sgl_accel
            print(json.dumps({p.name: p.state for p in sgl_accel.status()}))
            """
        )
    )
    states = json.loads(proc.stdout.strip().splitlines()[-1])
    # Every shipped patch but the opt-in ones was requested by the plugin (none is "not requested").
    opt_in = _opt_in_names()
    assert all(state != "skipped" for name, state in states.items() if name not in opt_in), states
    assert all(states[name] == "skipped" for name in opt_in), states
    assert "sgl_accel" in proc.stderr or states is not None


def test_sglang_does_not_warn_about_our_variables_in_activated_processes():
    proc = run_child("from sgl_accel.testing import standins; standins.activate(); import sglang.srt.environ", {"SGL_ACCEL": "1", "SGL_ACCEL_LOG_LEVEL": "WARNING"})
    assert "SGL_ACCEL" not in proc.stderr, proc.stderr


def test_sglang_importable_only_after_start_up_is_patched_on_import():
    """Failure 2: sys.path gains sglang after start-up (a script, ``python -I`` with paths added in code)."""
    site = os.environ["PYTHONPATH"].split(os.pathsep)[0]
    body = textwrap.dedent(
        f"""
        import json, sys, importlib
        sys.path.insert(0, {site!r})
        from sgl_accel.testing import standins
        standins.activate()
        import sgl_accel
        from sgl_accel import seams
        modules = seams.target_modules("ascend-gdn-conv1d-v2")
        for module in modules:
            importlib.import_module(module)
        report = sgl_accel.status(["ascend-gdn-conv1d-v2"])["ascend-gdn-conv1d-v2"]
        print(json.dumps([str(report.state), report.reason]))
        """
    )
    proc = run_child(body, {"SGL_ACCEL": "1", "SGL_ACCEL_HARDWARE": "ascend", "PYTHONPATH": ""})
    state, reason = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state not in ("pending-import", "skipped") and "not installed" not in reason, (state, reason)


@pytest.mark.parametrize("env", [{"SGL_ACCEL_LOG_LEVEL": "WARNING"}, {"SGL_ACCEL": "0", "SGL_ACCEL_DISABLE": "ascend-dflash"}])
def test_sglang_does_not_warn_about_our_variables_on_the_plugin_path(env):
    """Failure 11: SGL_ACCEL unset or 0 (the plugin decides), other SGL_ACCEL* variables set."""
    proc = run_child("from sgl_accel.testing import standins; standins.activate(); import sglang.srt.environ", env)
    assert "SGL_ACCEL" not in proc.stderr, proc.stderr
