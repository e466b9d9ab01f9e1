"""Build the compatibility matrix from real sglang release wheels.

For every release from 0.5.3.post3 to the newest on PyPI: download the wheel
(``pip download --no-deps``, cached), read the target modules out of it
without installing or importing anything, and run each patch's own structural
guard over them, the same ``plan_patch`` that ``sgl-accel status`` uses and the
same ``check_def`` that ``apply()`` uses. The result is ``matrix.json`` beside
this file: per release x patch a state with its reason, per part, and the
fingerprint of every target seen.

    python -m sgl_accel.compat.scanner            # full refresh from PyPI (make compat)
    python -m sgl_accel.compat.scanner --check DIR...   # compare installed releases with the matrix
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.version import Version

from .._registry import all_patches
from . import MATRIX_PATH, matrix_state

FIRST_RELEASE = Version("0.5.3.post3")
CACHE = Path(".cache/compat")


def scan_tree(sglang_root: str, version: str) -> dict:
    """{patch name: entry} for one sglang source tree (an installed or unpacked release)."""
    from .._plan import plan_patch

    result = {}
    for name, patch in all_patches().items():
        # The structure first, whatever the release gate says, so that the matrix shows
        # what each release's code is (absent, drifted, upstream) and records the
        # fingerprints of every target that passes the guard.
        report = plan_patch(patch, sglang_root, None, hardware=None, check_tested=False)
        state, reason = matrix_state(report), report.reason
        outside = _outside_releases(patch, version)
        if state == "applies" and outside:
            state, reason = "not-applicable", outside
        result[name] = {
            "state": state,
            "reason": reason,
            "parts": dict(report.parts),
            "targets": {t.target: {"state": t.state, "fingerprint": t.fingerprint} for t in report.targets},
        }
    return result


def _outside_releases(patch, version: str):
    """The release gate's reason, or None (the decision's own rule)."""
    from .._decide import release_reason

    return release_reason(patch, version)


def _target_files(version: str) -> list[str]:
    """Paths inside the wheel that the patches (and their gates) read."""
    paths = set()
    for patch in all_patches().values():
        modules = {t.module for t in patch.targets} | {m for t in patch.targets for m, _ in t.moved} | set(patch.gate_modules)
        for module in modules:
            rel = "/".join(module.split("."))
            paths.update({rel + ".py", rel + "/__init__.py"})
    return sorted(paths)


def unpack_targets(wheel: Path, dest: Path) -> Path:
    """Extract only the target modules of ``wheel`` under ``dest``; returns the sglang dir."""
    wanted = set(_target_files(""))
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member in wanted:
                archive.extract(member, dest)
    (dest / "sglang").mkdir(parents=True, exist_ok=True)
    return dest / "sglang"


def available_releases() -> list[str]:
    """Every sglang release on the index from FIRST_RELEASE on, oldest first."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "sglang"], capture_output=True, text=True, check=True
    )
    match = re.search(r"Available versions:\s*(.+)", proc.stdout)
    if not match:
        raise RuntimeError(f"could not read sglang versions from pip: {proc.stdout[:500]}")
    versions = [Version(v.strip()) for v in match.group(1).split(",")]
    return [str(v) for v in sorted(v for v in versions if v >= FIRST_RELEASE and not v.is_prerelease)]


def download(version: str, cache: Path = CACHE) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"sglang-{version}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.11", f"sglang=={version}", "-d", str(wheels)],
            check=True,
        )
        found = sorted(wheels.glob(f"sglang-{version}-*.whl"))
    return found[0]


def build_matrix(releases: list[str], cache: Path = CACHE) -> dict:
    from .. import __version__

    rows = {}
    for version in releases:
        wheel = download(version, cache)
        with tempfile.TemporaryDirectory() as tmp:
            root = unpack_targets(wheel, Path(tmp))
            rows[version] = scan_tree(str(root), version)
        print(f"scanned sglang {version}: " + ", ".join(f"{n}={e['state']}" for n, e in rows[version].items()), file=sys.stderr)
    return {
        "generated_by": "python -m sgl_accel.compat.scanner",
        "sgl_accel": __version__,
        "releases": releases,
        "patches": list(all_patches()),
        "matrix": rows,
    }


def write_matrix(matrix: dict, path: Path = MATRIX_PATH) -> None:
    path.write_text(json.dumps(matrix, indent=1, sort_keys=False) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgl_accel.compat.scanner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", nargs="*", help="only these releases (default: every release from 0.5.3.post3 on)")
    parser.add_argument("--cache", default=str(CACHE), help="wheel cache directory")
    parser.add_argument("--readme", default="README.md", help="README whose matrix table to regenerate")
    args = parser.parse_args(argv)
    releases = args.releases or available_releases()
    matrix = build_matrix(releases, Path(args.cache))
    write_matrix(matrix)
    from .table import update_readme

    update_readme(Path(args.readme), matrix)
    print(f"wrote {MATRIX_PATH} ({len(releases)} releases x {len(matrix['patches'])} patches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
