"""The ``sgl-accel`` command (also ``python -m sgl_accel``).

Exit codes: 0 success, 1 the answer is negative (e.g. ``diff`` of a patch that
does not apply here), 2 usage error (argparse), 3 bad environment setting.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _hardware(args):
    from ._detect import detect_hardware, parse_hardware

    if getattr(args, "hardware", None):
        return parse_hardware(args.hardware)
    return detect_hardware()


def cmd_list(args) -> int:
    from ._registry import all_patches

    patches = all_patches()
    if args.json:
        print(json.dumps([_describe(p) for p in patches.values()], indent=2))
        return 0
    for patch in patches.values():
        kind = patch.kind + (" opt-in" if patch.opt_in else "")
        print(f"{patch.name:24} {kind:15} {patch.upstream_pr:8} {'/'.join(patch.hardware):12} {patch.summary}")
    return 0


def _describe(patch) -> dict:
    return {
        "name": patch.name,
        "kind": patch.kind,
        "opt_in": patch.opt_in,
        "upstream_pr": patch.upstream_pr,
        "hardware": list(patch.hardware),
        "kernels": list(patch.kernels),
        "releases": patch.releases,
        "summary": patch.summary,
        "targets": [t.key for t in patch.targets],
    }


def cmd_status(args) -> int:
    """What apply() would do in a process started here, read from the installed source."""
    from ._detect import sglang_install
    from ._plan import plan_patch
    from ._registry import all_patches, resolve_names
    from ._report import Report

    install = sglang_install()
    hardware = _hardware(args)
    names = resolve_names(args.patches or None)
    reports = [plan_patch(all_patches()[n], install.location, install.version, hardware) for n in names]
    report = Report(reports, sglang=install.describe(), hardware=hardware.describe(), version=__version__)
    print(report.to_json() if args.json else report.table())
    return 0


def cmd_plan(args) -> int:
    """Like status, or for any release of the compatibility matrix without installing it."""
    if not args.sglang:
        return cmd_status(args)
    from .compat.query import NotInMatrix, plan_release

    try:
        report = plan_release(args.sglang, _hardware(args))
    except NotInMatrix as exc:
        print(f"sgl-accel: {exc}", file=sys.stderr)
        return 1
    print(report.to_json() if args.json else report.table())
    return 0


def cmd_pin(args) -> int:
    """The sglang releases on which every named patch gives its benefit (see compat.query)."""
    from ._detect import fleet_hardware
    from ._registry import resolve_names
    from .compat.query import explain, pin

    names = resolve_names(args.patches) if args.patches else None
    result = pin(names, fleet_hardware(args.hardware) if args.hardware else None)
    if args.explain:
        print(explain(result))
    if not result.requirement:
        print(f"sgl-accel: no sglang release in the matrix gives the benefit of every one of {', '.join(result.names)}", file=sys.stderr)
        return 1
    if args.format == "constraints":
        text = (
            f"# sgl-accel {__version__}: sglang releases with the benefit of {', '.join(result.names)}\n"
            f"# (applied by sgl-accel, already upstream, replaced by equivalent code, or not needed): "
            f"{', '.join(result.releases)}\n{result.requirement}\n"
        )
    else:
        text = result.requirement + "\n"
    if args.output:
        try:
            with open(args.output, "w") as f:
                f.write(text)
        except OSError as exc:
            print(f"sgl-accel: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0


def cmd_verify(args) -> int:
    from ._registry import resolve_names
    from ._verify import verify

    results = verify(resolve_names(args.patches or None), emulate=args.emulate)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            print(f"{r.patch:24} {r.outcome:8} max deviation {r.max_deviation:.3g}  {r.reason}")
            for case in r.cases:
                if not case["passed"]:
                    print(f"    {case['name']}: " + "; ".join(case["details"]))
    return 1 if any(r.outcome == "fail" for r in results) else 0


def cmd_bench(args) -> int:
    from . import _bench
    from ._registry import resolve_names

    if args.emulate:
        from .testing import standins

        standins.activate()
    names = resolve_names(args.patches or None)
    problem = _bench.device_problem(args.device)
    if problem:
        print(f"sgl-accel: {problem}", file=sys.stderr)
        return 2
    if args.apply_cost:
        result = _bench.apply_cost_report(pairs=args.pairs, emulate=args.emulate, apply_pairs=args.apply_pairs)
        print(json.dumps(result, indent=2) if args.json else _bench.render_apply_cost(result))
        return 0
    result = _bench.main_report(names, args.device, args.quick, loader=not args.no_loader)
    print(json.dumps(result, indent=2) if args.json else _bench.render(result))
    return 0


def cmd_diff(args) -> int:
    from ._detect import sglang_install
    from ._plan import diff_patch
    from ._registry import all_patches, resolve_names

    (name,) = resolve_names([args.name])
    install = sglang_install()
    if not install.installed:
        print("sglang is not installed", file=sys.stderr)
        return 1
    ok, text = diff_patch(all_patches()[name], install.location)
    print(text)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgl-accel",
        description="Backported sglang fixes and speed-ups for Ascend NPU and AMD ROCm: see what applies, and why.",
    )
    parser.add_argument("--version", action="version", version=f"sgl-accel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("status", help="what apply() would do here, per patch, with the reason")
    p.add_argument("patches", nargs="*", help="patch names (default: all)")
    p.add_argument("--hardware", help="override detection (ascend, rocm, rocm:gfx950, cuda, cpu)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("plan", help="what apply() would do, here or on any release of the compatibility matrix")
    p.add_argument("patches", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--sglang", metavar="VERSION", help="a release from the matrix (default: the installed sglang)")
    p.add_argument("--hardware", help="override detection (ascend, rocm, rocm:gfx950, cuda, cpu)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "pin",
        help="a pip requirement for the sglang releases on which every named patch gives its benefit "
        "(applied by sgl-accel, already upstream, replaced by equivalent code, or not needed)",
    )
    p.add_argument("patches", nargs="*", help="patch names (default: every patch but the opt-in ones, or those for --hardware)")
    p.add_argument("--hardware", help="only the patches for this hardware when no name is given")
    p.add_argument("--explain", action="store_true", help="also print, per release, each patch's state and reason")
    p.add_argument("--format", choices=("requirement", "constraints"), default="requirement")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_pin)

    p = sub.add_parser("verify", help="run each applicable patch's equivalence cases on this machine")
    p.add_argument("patches", nargs="*", help="patch names (default: all)")
    p.add_argument("--emulate", action="store_true", help="on CPU with the test-bed reference kernels (forced gates)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="original vs patched latency and ops per patch, and the loader's own costs")
    p.add_argument("patches", nargs="*", help="patch names (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--emulate", action="store_true", help="use the test-bed kernels (CPU, or CUDA with ROCm flags emulated)")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--no-loader", action="store_true", help="skip the loader's own costs")
    p.add_argument("--apply-cost", action="store_true", help="start-up and apply() costs as ratios to a bare interpreter (interleaved pairs, medians)")
    p.add_argument("--pairs", type=int, default=30, help="interleaved pairs for --apply-cost (default 30)")
    p.add_argument("--apply-pairs", type=int, help="pairs for the apply() figures (default: --pairs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("list", help="the patches sgl-accel ships")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("diff", help="unified diff between an installed target and its patched form")
    p.add_argument("name", help="patch name")
    p.set_defaults(func=cmd_diff)
    return parser


def main(argv=None) -> int:
    from ._detect import SettingError
    from ._registry import UnknownPatchError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UnknownPatchError as exc:
        print(f"sgl-accel: {exc}", file=sys.stderr)
        return 2
    except SettingError as exc:
        print(f"sgl-accel: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # no traceback from a command: one line, exit 1
        print(f"sgl-accel {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
