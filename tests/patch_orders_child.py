"""The child side of tests/test_patch_orders.py: one fresh interpreter runs one scenario.

    python tests/patch_orders_child.py SCENARIO SPEC.json OUT.json

SPEC names the patches to exercise (``name``, ``force``, ``keys``: the ``module:qualname``
of every target the compatibility matrix found in this release) and the target
modules to import. The child only observes; tests/test_patch_orders.py decides what
is right. After every step it records, per patch, the report of the call, the report
of ``status()``, and what each target's live owner attribute is:

* ``original``: the very object that was there before sgl-accel touched it;
* ``rewritten``: a new object compiled from the original's file whose
  ``__sgl_accel_original__`` is that original;
* anything else is described in words (a mix, a stray object, a lost original).

Scenarios (each in its own process, so each starts with nothing imported):

* ``import-first``: import the targets, then revert without apply, apply, apply again,
  revert, revert again, apply after revert, revert.
* ``apply-first``: ``SGL_ACCEL`` set in the environment (start-up activation through
  the .pth; forced patches are also ``apply(force=True)``-ed before the import), then
  import the targets, then revert and apply again.
* ``spawn``: a ``multiprocessing`` spawn child that inherits ``SGL_ACCEL`` imports the
  targets; nothing else calls sgl-accel in it.

Only public behaviour is used: ``sgl_accel.apply/revert/status``, the ``SGL_ACCEL*``
variables, the test-bed stand-ins and ``__sgl_accel_original__``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys

ORIGINAL_ATTR = "__sgl_accel_original__"
IMPORT_STEP = "import "  # + module: the step right after that module was imported
_keep_alive: list = []  # every object whose id() was recorded, so no id is ever reused


# --------------------------------------------------------------------------- live targets


def live_object(key: str):
    """The raw object on the target's owner (``owner.__dict__[attr]``), or None."""
    module_name, qualname = key.split(":")
    owner = sys.modules.get(module_name)
    *path, attr = qualname.split(".")
    for part in path:
        owner = vars(owner).get(part) if owner is not None else None
    return vars(owner).get(attr) if owner is not None else None


def _layers(obj):
    """The object, its ``__func__`` (static/class methods) and its ``__wrapped__`` chain."""
    function = getattr(obj, "__func__", obj)
    return [obj, function, inspect.unwrap(function)]


def recorded_original(obj):
    """What sgl-accel says ``obj`` replaced (``__sgl_accel_original__``), or None."""
    for layer in _layers(obj):
        original = vars(layer).get(ORIGINAL_ATTR) if hasattr(layer, "__dict__") else None
        if original is not None:
            return original
    return None


def _innermost_code(obj):
    return getattr(_layers(obj)[-1], "__code__", None)


def classify(obj, original) -> str:
    if obj is None:
        return "missing from its owner"
    if obj is original:
        return "original"
    carried = recorded_original(obj)
    if carried is None:
        return f"a foreign object {obj!r} (no {ORIGINAL_ATTR})"
    if carried is not original:
        return f"a patched object whose {ORIGINAL_ATTR} is not the original ({carried!r})"
    new_code, old_code = _innermost_code(obj), _innermost_code(original)
    if new_code is None or new_code is old_code:
        return "carries the original's code object: not a rewrite"
    if new_code.co_filename != old_code.co_filename:
        return f"compiled from {new_code.co_filename}, not {old_code.co_filename}"
    return "rewritten"


# --------------------------------------------------------------------------- recording


def _text(state) -> str:
    return str(getattr(state, "value", state))  # a str state, or an Enum of them


def _patch_record(report) -> dict:
    return {
        "state": _text(report.state),
        "reason": report.reason,
        "targets": {t.target: _text(t.state) for t in report.targets},
    }


class Recorder:
    def __init__(self, spec: dict):
        self.spec = spec
        self.originals: dict = {}
        self.steps: dict = {}

    def remember_originals(self, from_marks: bool) -> None:
        """The pre-sgl-accel object of every target: what is live now (nothing is
        patched yet), or, in processes that patched on import, what the live
        object says it replaced."""
        for patch in self.spec["patches"]:
            for key in patch["keys"]:
                obj = live_object(key)
                self.originals[key] = (recorded_original(obj) or obj) if from_marks else obj

    def record(self, step: str, returned=None) -> None:
        import sgl_accel

        names = [p["name"] for p in self.spec["patches"]]
        status = sgl_accel.status(names)
        out = {}
        for patch in self.spec["patches"]:
            name = patch["name"]
            entry = {"status": _patch_record(status[name]), "objects": {}, "ids": {}, "pristine": {}, "marked": {}}
            if returned is not None:
                entry["returned"] = _patch_record(returned[name])
            for key in patch["keys"]:
                obj = live_object(key)
                _keep_alive.append(obj)
                original = self.originals.get(key)
                entry["objects"][key] = classify(obj, original) if key in self.originals else None
                entry["ids"][key] = id(obj)
                entry["marked"][key] = recorded_original(obj) is not None
                # The remembered original must itself be untouched sglang code.
                entry["pristine"][key] = original is not None and recorded_original(original) is None
            out[name] = entry
        out["_modules_imported"] = sorted(m for m in self.spec["modules"] if m in sys.modules)
        self.steps[step] = out


def _apply_each(spec: dict) -> dict:
    import sgl_accel

    return {p["name"]: sgl_accel.apply([p["name"]], force=p["force"])[p["name"]] for p in spec["patches"]}


def _revert_all(spec: dict):
    import sgl_accel

    return sgl_accel.revert([p["name"] for p in spec["patches"]])


def _activate_standins() -> None:
    from sgl_accel.testing import standins

    standins.activate()


def _import_targets(spec: dict, rec: Recorder | None = None) -> None:
    """Import the target modules one by one; ``rec`` records the state after each."""
    for module in spec["modules"]:
        importlib.import_module(module)
        if rec is not None:
            rec.record(f"{IMPORT_STEP}{module}")


# --------------------------------------------------------------------------- scenarios


def import_first(spec: dict) -> dict:
    _activate_standins()
    _import_targets(spec)
    rec = Recorder(spec)
    rec.remember_originals(from_marks=False)
    rec.record("imported")
    rec.record("revert-without-apply", _revert_all(spec))
    rec.record("import-then-apply", _apply_each(spec))
    rec.record("apply-twice", _apply_each(spec))
    rec.record("revert", _revert_all(spec))
    rec.record("revert-twice", _revert_all(spec))
    rec.record("apply-after-revert", _apply_each(spec))
    rec.record("revert-after-reapply", _revert_all(spec))
    return rec.steps


def apply_first(spec: dict) -> dict:
    import sgl_accel

    for patch in spec["patches"]:
        if patch["force"]:  # forced gates cannot be asked for through SGL_ACCEL
            sgl_accel.apply([patch["name"]], force=True)
    rec = Recorder(spec)
    rec.record("before-import")
    _activate_standins()
    _import_targets(spec, rec)
    rec.remember_originals(from_marks=True)
    rec.record("apply-then-import")
    rec.record("revert-after-import", _revert_all(spec))
    rec.record("apply-after-revert", _apply_each(spec))
    rec.record("revert-after-reapply", _revert_all(spec))
    return {"startup": "sgl_accel._startup" in sys.modules, **rec.steps}


def spawn_child(spec: dict, queue) -> None:
    """Runs in the spawned interpreter: only the inherited SGL_ACCEL acts here."""
    try:
        rec = Recorder(spec)
        rec.record("before-import")
        _activate_standins()
        _import_targets(spec, rec)
        rec.remember_originals(from_marks=True)
        rec.record("spawn-child")
        queue.put({"startup": "sgl_accel._startup" in sys.modules, **rec.steps})
    except BaseException as exc:  # the parent must not wait for a result that never comes
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def spawn(spec: dict) -> dict:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=spawn_child, args=(spec, queue))
    child.start()
    result = queue.get(timeout=540)
    child.join(timeout=60)
    result["exitcode"] = child.exitcode
    result["parent_imported_sglang"] = "sglang" in sys.modules
    return result


SCENARIOS = {"import-first": import_first, "apply-first": apply_first, "spawn": spawn}


def main(argv) -> None:
    scenario, spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = SCENARIOS[scenario](spec)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
