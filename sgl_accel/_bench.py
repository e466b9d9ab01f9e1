"""``sgl-accel bench``: what a patch saves, and what the loader itself costs.

Per patch (cases modules that define ``BENCH``): original vs patched latency as
the median of per-round ratios over interleaved runs, plus aten ops,
allocations and bytes written per call from the op counter. Loader costs:
``import sgl_accel`` time, interpreter start with and without SGL_ACCEL, the
start-up hook's own cost, ``apply()`` of every patch with its targets imported,
and extra Python frames per patched call.

``--apply-cost`` (``apply_cost_report``): interpreter start-up with SGL_ACCEL unset,
0 and 1 (no sglang import), and ``apply()`` of every patch with its targets imported,
cold (fresh process, empty code cache), warm (fresh process, filled cache) and
repeated (same process, after ``revert()``), each as a ratio to a bare interpreter
start measured interleaved in the same run (median over the pairs). Targets, see
docs/BENCHMARKS.md. Nothing here resets the loader of the calling process: every
apply() is timed in a child process.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BenchCase:
    """``setup(device)`` returns (original, patched): zero-argument callables doing one call each."""

    patch: str
    name: str
    setup: Callable
    description: str = ""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interleaved(original: Callable, patched: Callable, device: str, rounds: int = 30, inner: int = 20, warmup: int = 5) -> dict:
    """Median latency of each and the median of per-round patched/original ratios."""
    for _ in range(warmup):
        original()
        patched()
    _sync(device)
    t_orig, t_new, ratios = [], [], []
    for r in range(rounds):
        pair = []
        # Alternate which side runs first so drift and caches favour neither.
        order = (original, patched) if r % 2 == 0 else (patched, original)
        timings = {}
        for fn in order:
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            timings[fn is patched] = (time.perf_counter() - start) / inner
        t_orig.append(timings[False])
        t_new.append(timings[True])
        ratios.append(timings[True] / timings[False])
    return {
        "original_us": statistics.median(t_orig) * 1e6,
        "patched_us": statistics.median(t_new) * 1e6,
        "ratio_median": statistics.median(ratios),
        "rounds": rounds,
        "calls_per_round": inner,
    }


def op_profile(fn: Callable) -> dict:
    from .testing.opcount import OpCounter

    with OpCounter() as counter:
        fn()
    return {"ops": dict(counter.ops), "allocations": counter.allocations, "bytes_allocated": counter.bytes_allocated, "bytes_written": counter.bytes_written}


def bench_patch(name: str, device: str, quick: bool = False) -> list:
    from ._registry import cases_module

    module_name = cases_module(name)
    if module_name is None:
        return []
    module = importlib.import_module(module_name)
    results = []
    for case in getattr(module, "BENCH", []):
        try:
            original, patched = case.setup(device)
        except Exception as exc:  # e.g. the installed release already has the change
            results.append({"patch": name, "case": case.name, "device": device, "not_run": f"{type(exc).__name__}: {exc}"})
            continue
        before, after = op_profile(original), op_profile(patched)
        timing = interleaved(original, patched, device, rounds=6 if quick else 30, inner=3 if quick else 20)
        removed = {op: n - after["ops"].get(op, 0) for op, n in before["ops"].items() if n != after["ops"].get(op, 0)}
        added = {op: n for op, n in after["ops"].items() if op not in before["ops"]}
        results.append(
            {
                "patch": name,
                "case": case.name,
                "description": case.description,
                "device": device,
                **timing,
                "ops_original": sum(before["ops"].values()),
                "ops_patched": sum(after["ops"].values()),
                "ops_removed": removed,
                "ops_added": added,
                "allocations": [before["allocations"], after["allocations"]],
                "bytes_written": [before["bytes_written"], after["bytes_written"]],
            }
        )
    return results


# --------------------------------------------------------------------------- loader costs


def _median_child_ms(code: str, env: dict, runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def loader_costs(runs: int = 15) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SGL_ACCEL")}
    probe = "import sys, time; t = time.perf_counter(); import sgl_accel; d = time.perf_counter() - t; print(d * 1e3, 'torch' in sys.modules, any(m.startswith('sglang') for m in sys.modules))"
    imports, heavy = [], False
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", probe], env=clean, check=True, capture_output=True, text=True).stdout.split()
        imports.append(float(out[0]))
        heavy = heavy or out[1] == "True" or out[2] == "True"
    result = {
        "import_sgl_accel_ms": statistics.median(imports),
        "import_pulls_torch_or_sglang": heavy,
        "interpreter_start_ms": _median_child_ms("pass", clean, runs),
        "interpreter_start_with_SGL_ACCEL_1_ms": _median_child_ms("pass", {**clean, "SGL_ACCEL": "1"}, runs),
        # The only thing sgl-accel adds to a start with SGL_ACCEL unset: its .pth line.
        "startup_hook_cost_us": startup_hook_cost_us(),
    }
    return result


def startup_hook_cost_us(repeat: int = 20000) -> float:
    """What sgl_accel_startup.pth adds to every interpreter start with SGL_ACCEL unset.

    site executes the file's line once per start; this times reading the file and
    executing that line, the whole of its work when the variable is unset.
    """
    import site

    path = None
    for directory in site.getsitepackages() + [site.getusersitepackages()]:
        candidate = os.path.join(directory, "sgl_accel_startup.pth")
        if os.path.exists(candidate):
            path = candidate
            break
    if path is None:
        return float("nan")
    saved = os.environ.pop("SGL_ACCEL", None)
    try:
        start = time.perf_counter()
        for _ in range(repeat // 100):
            with open(path) as f:
                line = f.read()
            code = compile(line, path, "exec")
            for _ in range(100):
                exec(code, {})
        return (time.perf_counter() - start) / repeat * 1e6 + _read_cost_us(path)
    finally:
        if saved is not None:
            os.environ["SGL_ACCEL"] = saved


def _read_cost_us(path: str, repeat: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        with open(path) as f:
            compile(f.read(), path, "exec")
    return (time.perf_counter() - start) / repeat * 1e6


def device_problem(device: str):
    """None if ``device`` can run here, else why not (naming what can)."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return None
    if kind != "cuda" or (index and not index.isdigit()):
        return f"--device {device!r} is not valid; valid values: cpu, cuda, cuda:<index>"
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:
        return f"--device {device}: torch cannot be used here ({type(exc).__name__}: {exc})"
    if count <= int(index or 0):
        return f"--device {device} is not available here ({count} CUDA device(s) found); valid values: cpu" + (", cuda" if count else "")
    return None


def added_frames() -> dict:
    """Per patched target in place, the Python frames between a caller and the rewritten code.

    The owner's attribute is called directly; a profiler hook records how many
    Python frames start before the target's own code object runs. Zero means the
    patched function is the code itself, not a wrapper around it.
    """
    from .seams import applied_objects

    out = {}
    for where, obj in applied_objects().items():
        function = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
        out[where] = _frames_before(function, getattr(function, "__code__", None))
    return out


def _frames_before(function, target_code) -> int:
    """Count Python frames entered between calling ``function`` and its code starting (0 = no wrapper)."""
    entered = []

    def profiler(frame, event, arg):
        if event == "call":
            entered.append(frame.f_code)
            if frame.f_code is target_code:
                raise _Reached

    sys.setprofile(profiler)
    try:
        function(*([None] * function.__code__.co_argcount))
    except _Reached:
        pass
    except Exception:
        pass
    finally:
        sys.setprofile(None)
    if target_code not in entered:
        return -1  # the code was never reached: report, do not guess
    return entered.index(target_code)


class _Reached(Exception):
    pass


def main_report(names, device: str, quick: bool, loader: bool) -> dict:
    result = {"device": device, "python": sys.version.split()[0], "patches": []}
    for name in names:
        result["patches"] += bench_patch(name, device, quick)
    if loader:
        result["loader"] = loader_costs(runs=5 if quick else 15)
    return result


def render(result: dict) -> str:
    lines = [f"sgl-accel bench on {result['device']} (python {result['python']})"]
    for row in result["patches"]:
        if "not_run" in row:
            lines.append(f"  {row['patch']:22} {row['case']:36} not run: {row['not_run']}")
            continue
        lines.append(
            f"  {row['patch']:22} {row['case']:36} original {row['original_us']:9.1f} us  patched {row['patched_us']:9.1f} us  "
            f"ratio {row['ratio_median']:.3f}  ops {row['ops_original']}->{row['ops_patched']}  allocs {row['allocations'][0]}->{row['allocations'][1]}  "
            f"bytes written {row['bytes_written'][0]}->{row['bytes_written'][1]}"
        )
    if "loader" in result:
        lines.append("  loader: " + json.dumps(result["loader"]))
    if "apply" in result:
        lines.append("  apply: " + json.dumps(result["apply"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- --apply-cost

APPLY_CHILD = """
import gc, importlib, json, sys, time
if {emulate}:
    from sgl_accel.testing import standins
    standins.activate()
import sgl_accel
from sgl_accel import _bench, seams
from sgl_accel._registry import all_patches
names = list(all_patches())
for name in names:
    for module in seams.target_modules(name):
        try:
            importlib.import_module(module)
        except Exception:
            pass
gc.collect()
start = time.perf_counter(); report = sgl_accel.apply(names, force=True); first = time.perf_counter() - start
applied = [p.name for p in report if p.state == "applied"]
frames = _bench.added_frames()
sgl_accel.revert(names); gc.collect()
start = time.perf_counter(); sgl_accel.apply(names, force=True); again = time.perf_counter() - start
print(json.dumps(dict(first_ms=first * 1e3, repeated_ms=again * 1e3, applied=applied, frames=frames)))
"""


def _start_ms(env: dict, code: str = "pass") -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return (time.perf_counter() - start) * 1e3


def _apply_child(env: dict, emulate: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", APPLY_CHILD.format(emulate=emulate)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _interleaved_ratios(bare, measure, pairs: int) -> dict:
    """Median of ``measure``/``bare`` over alternating pairs (which one runs first alternates)."""
    ratios, values, bases = [], [], []
    for i in range(pairs):
        if i % 2:
            value, base = measure(), bare()
        else:
            base, value = bare(), measure()
        ratios.append(value / base)
        values.append(value)
        bases.append(base)
    return {"ratio": statistics.median(ratios), "median_ms": statistics.median(values), "bare_ms": statistics.median(bases), "pairs": pairs}


def apply_cost_report(pairs: int = 30, emulate: bool = True, apply_pairs=None) -> dict:
    """The start-up and apply() figures of docs/BENCHMARKS.md (see the module docstring).
    ``apply_pairs``: pairs for the apply() figures (default ``pairs``; each is a process that imports sglang)."""
    apply_pairs = apply_pairs or pairs
    import tempfile

    clean = {k: v for k, v in os.environ.items() if not k.startswith("SGL_ACCEL")}
    bare = lambda: _start_ms(clean)  # noqa: E731
    result = {"python": sys.version.split()[0], "pairs": pairs, "startup": {}}
    for label, extra in (("unset", {}), ("SGL_ACCEL=0", {"SGL_ACCEL": "0"}), ("SGL_ACCEL=1, no sglang import", {"SGL_ACCEL": "1"})):
        result["startup"][label] = _interleaved_ratios(bare, lambda: _start_ms({**clean, **extra}), pairs)
    with tempfile.TemporaryDirectory() as root:
        warm_dir = os.path.join(root, "warm")
        first = _apply_child({**clean, "SGL_ACCEL_CACHE_DIR": warm_dir}, emulate)  # fills the warm cache
        runs = {"cold": [], "warm": [], "repeated": []}

        def cold():
            fresh = tempfile.mkdtemp(dir=root)
            out = _apply_child({**clean, "SGL_ACCEL_CACHE_DIR": fresh}, emulate)
            runs["cold"].append(out["first_ms"])
            runs["repeated"].append(out["repeated_ms"])
            return out["first_ms"]

        def warm():
            out = _apply_child({**clean, "SGL_ACCEL_CACHE_DIR": warm_dir}, emulate)
            runs["warm"].append(out["first_ms"])
            return out["first_ms"]

        result["apply"] = {
            "cold": _interleaved_ratios(bare, cold, apply_pairs),
            "warm": _interleaved_ratios(bare, warm, apply_pairs),
        }
        result["apply"]["repeated"] = {"median_ms": statistics.median(runs["repeated"]), "pairs": apply_pairs}
    result["applied"] = first["applied"]
    result["added_frames"] = first["frames"]
    return result


def render_apply_cost(result: dict) -> str:
    lines = [f"sgl-accel bench --apply-cost (python {result['python']}, {result['pairs']} interleaved pairs for start-up, {result['apply']['cold']['pairs']} for apply(), medians)", "| figure | median | ratio to a bare interpreter start |", "| --- | --- | --- |"]
    for label, row in result["startup"].items():
        lines.append(f"| start-up, {label} | {row['median_ms']:.1f} ms (bare {row['bare_ms']:.1f} ms) | {row['ratio']:.3f}x |")
    for label in ("cold", "warm"):
        row = result["apply"][label]
        lines.append(f"| apply() all, targets imported, fresh process, {label} cache | {row['median_ms']:.1f} ms | {row['ratio']:.3f}x |")
    lines.append(f"| apply() again in the same process after revert() | {result['apply']['repeated']['median_ms']:.1f} ms | |")
    frames = sorted(set(result["added_frames"].values()))
    lines.append(f"| added frames per patched call | {', '.join(map(str, frames)) or 'none patched'} | |")
    lines.append(f"applied: {', '.join(result['applied'])}")
    return "\n".join(lines)
