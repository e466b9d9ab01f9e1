"""Build the compatibility matrix from real sglang release wheels.

For every release from 0.5.3.post3 to the newest on the package index: download the wheel
(``pip download --no-deps``, kept in the wheel cache, so a second run downloads nothing),
read the target modules out of it without installing or importing anything, and run each
patch's own structural guard over them, the same ``plan_patch`` that ``sgl-accel status``
uses and the same ``check_def`` that ``apply()`` uses. The result is ``matrix.json`` beside
this file: per release x patch a state with a one-line reason naming the files and functions
looked at, per part, and the state, reason and fingerprint of every target seen.

    python -m sgl_accel.compat.scanner              # full refresh from the index (make compat)
    python -m sgl_accel.compat.scanner --cached     # only the wheels already in the cache, no index
    python -m sgl_accel.compat.scanner --index-url URL
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.version import InvalidVersion, Version

from .._registry import NotNeeded, all_patches
from . import MATRIX_PATH, TESTED_PATH, matrix_state, tested_index

FIRST_RELEASE = Version("0.5.3.post3")
CACHE = Path(".cache/compat")
PYPI = "https://pypi.org/simple"


class ScanError(RuntimeError):
    """A failure the scanner reports in one line (no traceback)."""


# --------------------------------------------------------------------------- one release


def scan_tree(sglang_root: str, version: str) -> dict:
    """{patch name: entry} for one sglang source tree (an installed or unpacked release)."""
    from .._plan import plan_patch

    result = {}
    for name, patch in all_patches().items():
        # The structure first, whatever the release gate says, so that the matrix shows
        # what each release's code is (absent, drifted, upstream) and records the
        # fingerprints of every target that passes the guard.
        report = plan_patch(patch, sglang_root, None, hardware=None, check_tested=False)
        targets = {t.target: _target_entry(t, sglang_root) for t in report.targets}
        state, reason = cell(patch, report, targets, sglang_root, version)
        result[name] = {
            "state": state,
            "reason": reason,
            "parts": dict(report.parts),
            "targets": targets,
        }
    return result


def _target_entry(target_report, sglang_root: str) -> dict:
    """A target's state, file (relative to site-packages), reason and fingerprint."""
    from .._guard import module_file

    module, qualname = target_report.target.split(":", 1)
    path = module_file(module, sglang_root)
    file = path.relative_to(Path(sglang_root).parent).as_posix() if path else "/".join(module.split(".")) + ".py"
    reason = target_report.reason
    if target_report.state == "absent":
        reason = f"{qualname} is not defined there" if path else f"no such file (looked for {qualname})"
    return {"state": target_report.state, "file": file, "reason": reason, "fingerprint": target_report.fingerprint}


def cell(patch, report, targets: dict, sglang_root: str, version: str) -> tuple[str, str]:
    """(state, one-line reason) of one matrix cell; the reason names each file and function looked at."""
    state = matrix_state(report)
    if state == "applies":
        outside = _outside_releases(patch, version)
        if outside:
            return "not-applicable", f"{outside}; " + _about(targets)
    if state == "not-applicable" and patch.gate is not None:
        from .._guard import SourceReader

        gate_reason = patch.gate(SourceReader(sglang_root))
        if isinstance(gate_reason, NotNeeded):
            return "not-needed", f"{gate_reason}; " + _about(targets)
        return state, f"{gate_reason or report.reason}; " + _about(targets)
    deciding = {
        "applies": ("applies",),
        "upstream": ("upstream",),
        "replaced": ("replaced", "upstream"),
        "older-form": ("older-form",),
        "absent": ("absent",),
        "drifted": ("drifted", "absent"),
    }.get(state)
    return state, _about(targets, deciding)


def _about(targets: dict, states=None) -> str:
    """``file: verdict`` for the targets in ``states`` (all when None), joined on one line."""
    chosen = [t for t in targets.values() if states is None or t["state"] in states] or list(targets.values())
    return "; ".join(f"{t['file']}: {t['reason']}" for t in chosen)


def _outside_releases(patch, version: str):
    """The release gate's reason, or None (the decision's own rule)."""
    from .._decide import release_reason

    return release_reason(patch, version)


def _target_files() -> list[str]:
    """Paths inside a wheel that the patches, their gates and their markers read."""
    modules = set()
    for patch in all_patches().values():
        modules |= set(patch.gate_modules)
        for target in patch.targets:
            modules |= {target.module} | {m for m, _ in target.moved}
            for marker in [*target.upstream, *(m for m, _ in target.replaced), *(m for m, _ in target.older)]:
                modules |= set(getattr(marker, "modules", ()))
    paths = set()
    for module in modules:
        rel = "/".join(module.split("."))
        paths.update({rel + ".py", rel + "/__init__.py"})
    return sorted(paths)


def unpack_targets(wheel: Path, dest: Path) -> Path:
    """Extract only the target modules of ``wheel`` under ``dest``; returns the sglang dir."""
    wanted = set(_target_files())
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member in wanted:
                archive.extract(member, dest)
    (dest / "sglang").mkdir(parents=True, exist_ok=True)
    return dest / "sglang"


# --------------------------------------------------------------------------- the index


def index_url(explicit: str | None = None) -> str:
    """The index pip would use: --index-url, else PIP_INDEX_URL, else pip's configuration, else PyPI."""
    if explicit:
        return explicit
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else PYPI


def check_index(url: str, timeout: float = 20) -> None:
    """Raise ScanError in one line when the index does not answer for sglang."""
    import ssl
    import urllib.error
    import urllib.request

    page = url.rstrip("/") + "/sglang/"
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    try:
        with urllib.request.urlopen(urllib.request.Request(page, method="HEAD"), timeout=timeout, context=context):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code not in (405, 501):  # some indexes refuse HEAD but answer GET
            raise ScanError(f"the package index {url} answered HTTP {exc.code} for {page}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        raise ScanError(f"cannot reach the package index {url} ({why}); run again when it is reachable, or use --cached") from None


def _pip_index_args(url: str | None) -> list[str]:
    return ["--index-url", url] if url else []


def available_releases(url: str | None = None) -> list[str]:
    """Every sglang release on the index from FIRST_RELEASE on, oldest first."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "sglang", "--retries", "1", *_pip_index_args(url)],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Available versions:\s*(.+)", proc.stdout)
    if proc.returncode != 0 or not match:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or [proc.stderr.strip()[-200:]]
        raise ScanError(f"pip could not list the sglang releases on {url or 'the configured index'}: {errors[-1]}")
    versions = [Version(v.strip()) for v in match.group(1).split(",")]
    return [str(v) for v in sorted(v for v in versions if v >= FIRST_RELEASE and not v.is_prerelease)]


def cached_releases(cache: Path = CACHE) -> list[str]:
    """Releases whose wheel is already in the cache, oldest first."""
    found = set()
    for wheel in (cache / "wheels").glob("sglang-*.whl"):
        try:
            found.add(Version(wheel.name.split("-")[1]))
        except InvalidVersion:
            continue
    return [str(v) for v in sorted(v for v in found if v >= FIRST_RELEASE)]


def cached_wheel(version: str, cache: Path = CACHE) -> Path | None:
    """The cached wheel of ``version``; a truncated or corrupt one is removed (downloaded again)."""
    for wheel in sorted((cache / "wheels").glob(f"sglang-{version}-*.whl")):
        if zipfile.is_zipfile(wheel):
            return wheel
        wheel.unlink()
    return None


def download(version: str, cache: Path = CACHE, url: str | None = None) -> Path:
    """The wheel of ``version``: from the cache, else downloaded with pip (its own progress bar)."""
    wheel = cached_wheel(version, cache)
    if wheel is not None:
        return wheel
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
         "--progress-bar", "on", "--retries", "2", *_pip_index_args(url), f"sglang=={version}", "-d", str(wheels)],
        stdout=sys.stderr,  # pip's per-download progress bar, beside ours on the terminal
        stderr=subprocess.PIPE,
        text=True,
    )
    wheel = cached_wheel(version, cache)
    if proc.returncode != 0 or wheel is None:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or ["no wheel"]
        raise ScanError(f"downloading sglang {version} failed: {errors[-1]} (the wheels already in {wheels} are kept: run again to resume)")
    return wheel


# --------------------------------------------------------------------------- the matrix


def _progress(items, desc: str, **kwargs):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="release", file=sys.stderr, dynamic_ncols=True, **kwargs)


def fetch_wheels(releases: list[str], cache: Path = CACHE, url: str | None = None) -> dict:
    """{release: wheel path}; only wheels missing from the cache are downloaded (a resumed run)."""
    wheels = {v: cached_wheel(v, cache) for v in releases}
    missing = [v for v, w in wheels.items() if w is None]
    if missing:
        print(f"{len(releases) - len(missing)} of {len(releases)} wheels in {cache / 'wheels'}; downloading {len(missing)}", file=sys.stderr)
        for version in (bar := _progress(missing, "download")):
            bar.set_postfix_str(f"sglang {version}")
            wheels[version] = download(version, cache, url)
    return wheels


def build_matrix(releases: list[str], cache: Path = CACHE, url: str | None = None) -> dict:
    from .. import __version__

    wheels = fetch_wheels(releases, cache, url)
    rows = {}
    for version in (bar := _progress(releases, "scan")):
        bar.set_postfix_str(f"sglang {version}")
        with tempfile.TemporaryDirectory() as tmp:
            root = unpack_targets(wheels[version], Path(tmp))
            rows[version] = scan_tree(str(root), version)
    return {
        "generated_by": "python -m sgl_accel.compat.scanner",
        "sgl_accel": __version__,
        "releases": releases,
        "patches": list(all_patches()),
        "matrix": rows,
    }


def write_matrix(matrix: dict, path: Path = MATRIX_PATH, tested_path: Path = TESTED_PATH) -> None:
    path.write_text(json.dumps(matrix, indent=1, sort_keys=False) + "\n")
    tested_path.write_text(json.dumps(tested_index(matrix), indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgl_accel.compat.scanner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", nargs="*", help="only these releases (default: every release from 0.5.3.post3 on)")
    parser.add_argument("--cache", default=str(CACHE), help="wheel cache directory (default: .cache/compat)")
    parser.add_argument("--cached", action="store_true", help="scan the wheels already in the cache; never contact the index")
    parser.add_argument("--index-url", help="package index to list and download from (default: pip's)")
    parser.add_argument("--readme", default="README.md", help="README whose matrix table to regenerate")
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    try:
        if args.cached:
            releases = args.releases or cached_releases(cache)
            missing = [v for v in releases if cached_wheel(v, cache) is None]
            if not releases or missing:
                raise ScanError(f"--cached: no wheel in {cache / 'wheels'} for {', '.join(missing) or 'any release'}")
        else:
            check_index(index_url(args.index_url))
            releases = args.releases or available_releases(args.index_url)
        matrix = build_matrix(releases, cache, args.index_url)
    except ScanError as exc:
        print(f"sgl-accel compat: {exc}", file=sys.stderr)
        return 1
    write_matrix(matrix)
    from .table import update_readme

    update_readme(Path(args.readme), matrix)
    print(f"wrote {MATRIX_PATH} ({len(releases)} releases x {len(matrix['patches'])} patches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
