"""Every shipped patch in every order, each order in a fresh interpreter (issue 13, part 3).

In the spirit of dd-trace-py's PatchTestCase, generated from the registry: for every
patch of ``sgl_accel._registry.all_patches()`` and every order below, on the release
under test (SGL_ACCEL_TEST_SGLANG), wherever the compatibility matrix found the
patch's code in that release. After every step of every order each target's live
owner attribute is either the rewritten function (its ``__sgl_accel_original__`` is
the very original) or the identical original, as the matrix cell says, never a mix;
and the report agrees with the objects (``applied`` exactly when they are rewritten).

Orders: import then apply; apply then import (``SGL_ACCEL=1`` at start-up: the report
goes from ``pending-import`` to the matrix state on import; nothing lands before the
patch's last target module is imported); apply twice; revert twice; revert without
apply; apply after revert (after an explicit apply, and after patching on import);
``SGL_ACCEL=1`` in a multiprocessing ``spawn`` child. Processes, per emulated hardware (tests/patch_orders_child.py): one
runs every import-first order in sequence, one the apply-first orders, one a spawn
child; they run two at a time.

What is expected comes from the matrix (``sgl_accel/compat/matrix.json``), never typed
here: ``applies`` -> rewritten; ``upstream`` -> ``upstream`` and nothing changed;
``not-applicable``/``not-needed`` -> nothing changed, unless an override forces the gates
(then the parts the matrix found applicable are rewritten, as ``apply(force=True)``
promises); ``drifted``/``replaced`` -> ``skipped``, nothing changed; ``absent``/``older-form``
-> not exercised (the code the patch changes is not there). How each patch is exercised
follows from its declared hardware (``derived_exercise``); OVERRIDES and NOT_EXERCISED
(with reasons) hold the exceptions. A registered patch the harness can neither derive nor
find listed fails ``test_every_registered_patch_is_in_the_harness``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

from patch_orders_child import IMPORT_STEP
from sgl_accel._registry import all_patches

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("patch_orders_child.py")
MATRIX = ROOT / "sgl_accel" / "compat" / "matrix.json"
RELEASE = os.environ.get("SGL_ACCEL_TEST_SGLANG") or None
PARALLEL = 2  # scenario processes at a time (CI has 2 cores)


@dataclass(frozen=True)
class Exercise:
    hardware: str  # SGL_ACCEL_HARDWARE for this patch's processes
    force: bool = False  # apply(force=True) in the orders that call apply()
    why: str = ""


# How a patch is exercised on CPU follows from its declared hardware: the emulated machine
# of the first kind (in Patch.hardware order) that every part's gate accepts. gfx950 is the
# ROCm arch with the widest gates (gfx95 with aiter, the stand-in); the stand-ins provide
# the kernels. Opt-in patches are named in the SGL_ACCEL orders (_sgl_accel_value).
EMULATED = {"ascend": "ascend", "rocm": "rocm:gfx950", "cuda": "cuda"}
# Only patches that need something the rule above does not give, with the reason.
OVERRIDES: dict[str, Exercise] = {}
# Patches that cannot be exercised on any test release, with the reason.
NOT_EXERCISED: dict[str, str] = {}


def emulated(spec: str):
    """The machine a child process of the harness sees: SGL_ACCEL_HARDWARE=spec, with the stand-ins (aiter among them)."""
    from sgl_accel._detect import Hardware

    kind, _, arch = spec.partition(":")
    return Hardware(kind=kind, arch=arch or None, details={"aiter": True}, overridden=True)


def derived_exercise(patch):
    """Exercise on the first declared hardware kind whose emulated machine passes every part's
    hardware gate (the loader's own, _decide.hardware_reason), else None."""
    from sgl_accel._decide import hardware_reason

    for kind in patch.hardware:
        if kind in EMULATED and all(hardware_reason(patch, part, emulated(EMULATED[kind])) is None for part in patch.parts):
            return Exercise(EMULATED[kind])
    return None


def exercise_of(name: str, patch=None):
    """How ``name`` is exercised: its override, else derived from its hardware (None: not exercised)."""
    if name in NOT_EXERCISED:
        return None
    return OVERRIDES.get(name) or derived_exercise(patch or all_patches()[name])


def harness() -> dict:
    """{patch name: Exercise} for every registered patch the harness exercises."""
    return {name: ex for name in all_patches() if (ex := exercise_of(name)) is not None}


# Order -> (scenario process, the steps of that process it is judged on).
ORDERS = {
    "import-then-apply": ("import-first", ("imported", "import-then-apply")),
    "apply-then-import": ("apply-first", ("before-import", "apply-then-import", "revert-after-import")),
    "apply-twice": ("import-first", ("import-then-apply", "apply-twice")),
    "revert-twice": ("import-first", ("revert", "revert-twice")),
    "revert-without-apply": ("import-first", ("revert-without-apply",)),
    "apply-after-revert": ("import-first", ("revert", "apply-after-revert", "revert-after-reapply")),
    "apply-after-revert-on-import-path": ("apply-first", ("revert-after-import", "apply-after-revert", "revert-after-reapply")),
    "spawn-child": ("spawn", ("before-import", "spawn-child")),
}
# Steps after which every target must be the identical original (before any apply, after a revert).
UNPATCHED_STEPS = ("imported", "revert-without-apply", "revert", "revert-twice", "revert-after-reapply", "revert-after-import")
FORCED_SCENARIOS = ("import-first", "apply-first")  # SGL_ACCEL alone cannot force a gate


# --------------------------------------------------------------------------- the registry


def unlisted(patches: dict) -> list:
    """Registered patches the harness neither exercises nor excuses."""
    return [name for name, patch in patches.items() if name not in NOT_EXERCISED and exercise_of(name, patch) is None]


def test_every_registered_patch_is_in_the_harness():
    registry = all_patches()
    assert unlisted(registry) == [], "give these patches an entry in OVERRIDES (or NOT_EXERCISED with a reason)"
    stale = [name for name in [*OVERRIDES, *NOT_EXERCISED] if name not in registry]
    assert stale == [], "no longer registered: remove from the harness"
    assert not set(OVERRIDES) & set(NOT_EXERCISED)
    assert all(NOT_EXERCISED.values()), "every excused patch needs its reason"
    assert all(ex.why for ex in OVERRIDES.values()), "every override needs its reason"


def test_a_new_patch_is_exercised_from_its_hardware_or_caught():
    """A sixth backport needs no line here when one emulated machine passes all its parts'
    gates; one whose parts need different machines fails until it is listed."""
    import dataclasses

    from sgl_accel._registry import Part

    template = next(p for p in all_patches().values() if p.hardware == ("ascend",) and len(p.parts) == 1)
    ascend = dataclasses.replace(template, name="a-sixth-backport")
    assert unlisted({**all_patches(), ascend.name: ascend}) == []
    assert exercise_of(ascend.name, ascend) == Exercise("ascend")
    targets = template.parts[0].targets
    split = dataclasses.replace(
        template, name="a-split-backport", hardware=("ascend", "rocm"),
        parts=[Part("npu", targets, hardware=("ascend",)), Part("gpu", targets, hardware=("rocm",))],
    )
    assert unlisted({**all_patches(), split.name: split}) == ["a-split-backport"]


def test_the_harness_hardware_passes_every_part_gate():
    from sgl_accel._decide import hardware_reason

    for name, exercise in harness().items():
        patch = all_patches()[name]
        for part in patch.parts:
            assert hardware_reason(patch, part, emulated(exercise.hardware)) is None, (name, part.name, exercise.hardware)


def test_the_test_releases_are_in_the_matrix():
    assert release_list() and set(release_list()) <= set(_matrix()["releases"])


def test_every_harness_patch_is_exercised_on_some_test_release():
    for name, exercise in harness().items():
        cells = {release: expectation(name, release, forced=exercise.force) for release in release_list()}
        assert any(cells.values()), f"{name} runs on no test release: move it to NOT_EXERCISED with the reason"


# --------------------------------------------------------------------------- expectations


@lru_cache(maxsize=1)
def _matrix() -> dict:
    return json.loads(MATRIX.read_text())


@lru_cache(maxsize=1)
def release_list() -> tuple:
    """The test releases, from the one place that names them (scripts/run-tests.sh)."""
    text = (ROOT / "scripts" / "run-tests.sh").read_text()
    return tuple(re.search(r'RELEASES=\$\{SGLANG_RELEASES:-"([^"]+)"\}', text).group(1).split())


@dataclass(frozen=True)
class Expect:
    state: str  # the report state once the targets are imported (and apply() was called)
    keys: tuple  # every target the matrix found in the release
    rewritten: frozenset  # the targets that must be the rewritten ones

    @property
    def objects(self) -> dict:
        return {key: "rewritten" if key in self.rewritten else "original" for key in self.keys}


def _part_of(patch, key: str) -> str:
    module, qualname = key.split(":")
    for part in patch.parts:
        for target in part.targets:
            if (module, qualname) in [(target.module, target.qualname), *map(tuple, target.moved)]:
                return part.name
    raise AssertionError(f"{key} (matrix) is no target of {patch.name}")


# Matrix cell state -> the state apply() reports once the targets are imported, where the
# code the patch changes is there. Cells without it (absent, older-form) are not exercised;
# a state missing from both fails loudly (teach the harness what apply() does there).
REPORT_STATE = {
    "applies": "applied",
    "upstream": "upstream",
    "not-applicable": "not-applicable",  # the release range
    "not-needed": "not-applicable",  # the feature gate: the release's own code is right
    "drifted": "skipped",
    "replaced": "skipped",  # the structural guard leaves other code alone
}
NOT_THERE = ("absent", "older-form")
FORCIBLE = ("not-applicable", "not-needed")  # gates that force=True skips


def expectation(name: str, release: str, forced: bool):
    """What the matrix cell says apply() reaches, or None where the code is not there."""
    cell = _matrix()["matrix"][release][name]
    if cell["state"] in NOT_THERE:
        return None
    assert cell["state"] in REPORT_STATE, f"matrix state {cell['state']!r} ({name}, {release}) is new to the harness"
    patch = all_patches()[name]
    keys = tuple(key for key, target in cell["targets"].items() if target["state"] != "absent")
    applicable = frozenset(
        key for key in keys if cell["targets"][key]["state"] == "applies" and cell["parts"][_part_of(patch, key)] == "applies"
    )
    if cell["state"] == "applies" or (forced and cell["state"] in FORCIBLE and applicable):
        return Expect("applied", keys, applicable)
    if not _pending_before_import(name, release, forced):
        # apply() decides the release range first; the matrix shows the code's shape whatever the range.
        return Expect("not-applicable", keys, frozenset())
    return Expect(REPORT_STATE[cell["state"]], keys, frozenset())


def _pending_before_import(name: str, release: str, forced: bool) -> bool:
    """The release gate (the one gate decided before import) holds, or is forced."""
    from sgl_accel._decide import release_reason

    return forced or release_reason(all_patches()[name], release) is None


# --------------------------------------------------------------------------- the processes


def _plan(release: str) -> dict:
    """{hardware: spec} for the patches exercised on this release."""
    groups: dict = {}
    for name, exercise in harness().items():
        if expectation(name, release, exercise.force) is None:
            continue
        keys = expectation(name, release, exercise.force).keys
        spec = groups.setdefault(exercise.hardware, {"patches": [], "modules": []})
        spec["patches"].append({"name": name, "force": exercise.force, "keys": list(keys)})
        spec["modules"] = list(dict.fromkeys(spec["modules"] + [key.split(":")[0] for key in keys]))
    return groups


def _sgl_accel_value(names) -> str:
    """SGL_ACCEL for the processes that activate at start-up: "1" unless an opt-in
    patch is among them (SGL_ACCEL=1 skips those; they apply when named)."""
    return ",".join(names) if any(all_patches()[n].opt_in for n in names) else "1"


def _run(scenario: str, hardware: str, spec: dict, workdir: Path) -> dict:
    tag = f"{scenario}-{hardware.replace(':', '-')}"
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGL_ACCEL") or k == "SGL_ACCEL_TEST_SGLANG"}
    env["SGL_ACCEL_HARDWARE"] = hardware
    if scenario != "import-first":
        env["SGL_ACCEL"] = _sgl_accel_value([p["name"] for p in spec["patches"]])
    proc = subprocess.run(
        [sys.executable, str(CHILD), scenario, str(spec_path), str(out_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    result = json.loads(out_path.read_text()) if proc.returncode == 0 else None
    warnings = [line for line in proc.stderr.splitlines() if "sgl-accel" in line or "sgl_accel" in line]
    return {"rc": proc.returncode, "stderr": proc.stderr[-4000:], "result": result, "warnings": warnings}


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """{(scenario, hardware): what the child process saw}; every process runs once."""
    if not RELEASE:
        pytest.skip("needs a sglang release")
    workdir = tmp_path_factory.mktemp("patch-orders")
    jobs = [(scenario, hw, spec) for hw, spec in _plan(RELEASE).items() for scenario in ("import-first", "apply-first", "spawn")]
    with ThreadPoolExecutor(PARALLEL) as pool:
        runs = pool.map(lambda job: _run(*job, workdir), jobs)
        return {(scenario, hw): run for (scenario, hw, _), run in zip(jobs, runs)}


def _scenario_result(observed, scenario: str, hardware: str) -> dict:
    run = observed[(scenario, hardware)]
    assert run["rc"] == 0, f"{scenario} process ({hardware}) failed:\n{run['stderr']}"
    return run["result"]


# --------------------------------------------------------------------------- the checks


def _check_step(step: str, entry: dict, expect: Expect, scenario: str) -> None:
    where = f"after {step} ({scenario})"
    state, reason = entry["status"]["state"], entry["status"]["reason"]
    if step in UNPATCHED_STEPS:
        wanted = {key: "original" for key in expect.keys}
        assert state not in ("applied", "pending-import"), f"{where}: status says {state} ({reason}) with the originals in place"
    else:
        wanted = expect.objects
        assert state == expect.state, f"{where}: state {state} ({reason}), the matrix says {expect.state}"
    assert entry["objects"] == wanted, f"{where}: live objects {entry['objects']}, expected {wanted} (state {state}: {reason})"
    assert all(entry["pristine"].values()), f"{where}: a remembered original carries sgl-accel's mark: {entry['pristine']}"
    # The report names as applied exactly the targets that are rewritten.
    rewritten = {key for key, what in wanted.items() if what == "rewritten"}
    for view in ("status", "returned"):
        if view in entry:
            applied = {key for key, s in entry[view]["targets"].items() if s == "applied"}
            assert applied == rewritten, f"{where}: the {view} report lists applied targets {applied}, the objects say {rewritten}"
    if "returned" in entry:
        assert entry["returned"]["state"] == state, f"{where}: the call returned {entry['returned']['state']}, status() says {state}"


def _check_before_import(entry: dict, name: str, forced: bool) -> None:
    state, reason = entry["status"]["state"], entry["status"]["reason"]
    assert entry["_imported"] == [], f"target modules imported before the import step: {entry['_imported']}"
    if _pending_before_import(name, RELEASE, forced):
        assert state == "pending-import", f"before import: {state} ({reason})"
    else:
        assert state == "not-applicable", f"before import: {state} ({reason})"
    assert "applied" not in entry["status"]["targets"].values(), f"before import: {entry['status']['targets']}"


def _check_while_importing(result: dict, name: str, expect: Expect, pending: bool) -> None:
    """After each target module's import: nothing of the patch lands before its last
    target module is imported, and all of it (as the matrix says) once it is."""
    keys_modules = {key.split(":")[0] for key in expect.keys}
    for step in (s for s in result if s.startswith(IMPORT_STEP)):
        entry = result[step][name]
        state, reason = entry["status"]["state"], entry["status"]["reason"]
        marked = {key for key, is_marked in entry["marked"].items() if is_marked}
        if keys_modules <= set(result[step]["_modules_imported"]):
            assert state == expect.state, f"after {step}: {state} ({reason}), the matrix says {expect.state}"
            assert marked == set(expect.rewritten), f"after {step}: patched {marked}, expected {set(expect.rewritten)}"
        else:
            assert state == ("pending-import" if pending else "not-applicable"), f"after {step}: {state} ({reason})"
            assert marked == set(), f"after {step}: {marked} patched before the patch's last module was imported"


def _cases():
    return [pytest.param(name, order, id=f"{name}-{order}") for name in all_patches() for order in ORDERS]


@pytest.mark.sglang
@pytest.mark.parametrize("name, order", _cases())
def test_patch_in_order(observed, name, order):
    if name in NOT_EXERCISED:
        pytest.skip(NOT_EXERCISED[name])
    exercise = exercise_of(name)
    assert exercise is not None, f"{name} is registered but the harness cannot exercise it: add it to OVERRIDES or NOT_EXERCISED"
    scenario, steps = ORDERS[order]
    forced = exercise.force and scenario in FORCED_SCENARIOS
    expect = expectation(name, RELEASE, forced)
    if expect is None:
        pytest.skip(f"the matrix finds no code of {name} in sglang {RELEASE}: {_matrix()['matrix'][RELEASE][name]['reason']}")
    result = _scenario_result(observed, scenario, exercise.hardware)
    if scenario != "import-first":
        assert result["startup"] is True, "SGL_ACCEL did not activate sgl-accel at start-up"
    if scenario == "spawn":
        assert result["exitcode"] == 0 and not result["parent_imported_sglang"]
    for step in steps:
        entry = {**result[step][name], "_imported": result[step]["_modules_imported"]}
        if step == "before-import":
            _check_before_import(entry, name, forced)
        else:
            _check_step(step, entry, expect, scenario)
    if scenario in ("apply-first", "spawn") and order != "apply-after-revert-on-import-path":
        _check_while_importing(result, name, expect, _pending_before_import(name, RELEASE, forced))
    if order == "apply-twice":
        first, second = result["import-then-apply"][name]["ids"], result["apply-twice"][name]["ids"]
        assert first == second, "a second apply() replaced the objects of the first"


@pytest.mark.sglang
@pytest.mark.parametrize("scenario", ["import-first", "apply-first", "spawn"])
def test_scenario_processes_log_no_warning(observed, scenario):
    """No patch failed, nothing was rolled back, no false "replaced by other code"."""
    runs = {hw: run for (sc, hw), run in observed.items() if sc == scenario}
    if not runs:
        pytest.skip(f"no patch is exercised on sglang {RELEASE}")
    for hardware, run in runs.items():
        assert run["rc"] == 0, run["stderr"]
        assert run["warnings"] == [], f"{scenario} ({hardware}) logged: {run['warnings']}"


# --------------------------------------------------------------------------- the checks can fail


def _function(source: str, filename: str):
    namespace: dict = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["target"]


def test_classify_tells_rewritten_original_and_strays_apart():
    from patch_orders_child import classify

    original = _function("def target():\n    return 1\n", "sglang_module.py")
    rewritten = _function("def target():\n    return 2\n", "sglang_module.py")
    rewritten.__sgl_accel_original__ = original
    assert classify(original, original) == "original"
    assert classify(rewritten, original) == "rewritten"
    raw_original = staticmethod(original)  # the mark names the raw object from the owner's __dict__
    raw_rewritten = staticmethod(_function("def target():\n    return 2\n", "sglang_module.py"))
    raw_rewritten.__func__.__sgl_accel_original__ = raw_original
    assert classify(raw_rewritten, raw_original) == "rewritten"
    assert classify(None, original) == "missing from its owner"
    stray = _function("def target():\n    return 2\n", "sglang_module.py")
    assert "foreign" in classify(stray, original)
    other = _function("def target():\n    return 3\n", "sglang_module.py")
    assert "not the original" in classify(rewritten, other)
    elsewhere = _function("def target():\n    return 2\n", "somewhere_else.py")
    elsewhere.__sgl_accel_original__ = original
    assert "compiled from" in classify(elsewhere, original)
    import functools

    @functools.wraps(original)
    def wrapper():  # a wrapper frame around the very original code is no rewrite
        return original()

    wrapper.__sgl_accel_original__ = original
    assert classify(wrapper, original) == "carries the original's code object: not a rewrite"


def _entry(state, objects, applied_targets=()):
    return {
        "status": {"state": state, "reason": "", "targets": {k: "applied" for k in applied_targets}},
        "objects": objects,
        "pristine": {k: True for k in objects},
    }


def test_check_step_refuses_a_mix_and_a_report_that_disagrees_with_the_objects():
    expect = Expect("applied", ("m:A.f", "m:A.g"), frozenset({"m:A.f", "m:A.g"}))
    both = {"m:A.f": "rewritten", "m:A.g": "rewritten"}
    _check_step("import-then-apply", _entry("applied", both, both), expect, "import-first")
    mixed = {"m:A.f": "rewritten", "m:A.g": "original"}
    with pytest.raises(AssertionError, match="live objects"):
        _check_step("import-then-apply", _entry("applied", mixed, both), expect, "import-first")
    with pytest.raises(AssertionError, match="lists applied targets"):
        _check_step("import-then-apply", _entry("applied", both, ["m:A.f"]), expect, "import-first")
    originals = {"m:A.f": "original", "m:A.g": "original"}
    _check_step("revert", _entry("skipped", originals), expect, "import-first")
    with pytest.raises(AssertionError, match="with the originals in place"):
        _check_step("revert", _entry("applied", originals), expect, "import-first")
    upstream = Expect("upstream", ("m:A.f",), frozenset())
    with pytest.raises(AssertionError, match="live objects"):
        _check_step("import-then-apply", _entry("upstream", {"m:A.f": "rewritten"}), upstream, "import-first")
