"""``sgl-accel bench``: what a patch saves, and what the loader itself costs.

Per patch (cases modules that define ``BENCH``): original vs patched latency as
the median of per-round ratios over interleaved runs, plus aten ops,
allocations and bytes written per call from the op counter. Loader costs:
``import sgl_accel`` time, interpreter start with and without SGL_ACCEL, the
start-up hook's own cost, ``apply()`` of every patch with its targets imported,
and extra Python frames per patched call.

Targets (benchmark results, not tests): import <= 20 ms without torch; start-up
with SGL_ACCEL unset <= 1 ms over a bare interpreter; apply() of all five <= 50 ms
once targets are imported; zero added frames.
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


def apply_cost(runs: int = 5) -> dict:
    """apply() of every patch once its targets are imported (forced, so every patch really applies)."""
    from . import _loader
    from ._registry import all_patches

    names = list(all_patches())
    for patch in all_patches().values():
        for module in _loader.modules_of(patch):
            importlib.import_module(module)
    import gc

    samples, report = [], None
    for _ in range(runs + 1):
        _loader._reset_for_tests()
        gc.collect()  # a collection of the previous run's garbage is not apply()'s cost
        start = time.perf_counter()
        report = _loader.apply(names, force=True, allow_untested=True)
        samples.append((time.perf_counter() - start) * 1e3)
    frames = added_frames()
    _loader._reset_for_tests()
    return {
        "apply_all_first_ms": samples[0],  # the one a real process pays: nothing cached yet
        "apply_all_ms": statistics.median(samples[1:]),
        "applied": [p.name for p in report if p.state == "applied"],
        "states": report.states(),
        "added_frames": frames,
    }


def added_frames() -> dict:
    """Per patched target, the Python frames between a caller and the rewritten code.

    The owner's attribute is called directly; a profiler hook records how many
    Python frames start before the target's own code object runs. Zero means the
    patched function is the code itself, not a wrapper around it.
    """
    from . import _loader

    out = {}
    for state in _loader._states.values():
        for swap in state.swaps:
            obj = swap.owner.__dict__[swap.attr]
            function = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
            target_code = getattr(function, "__code__", None)
            out[f"{getattr(swap.owner, '__name__', swap.owner)}.{swap.attr}"] = _frames_before(function, target_code)
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
