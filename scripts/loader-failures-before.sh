#!/usr/bin/env bash
# Run this checkout's tests/test_loader_failures.py against the loader of an earlier commit
# (default 2c76e5c: main before the issue-13 loader merge 61ad4a2), to show which test fails
# before the fix, then probe the old behaviour where a test stops at a wording or a missing API.
#   bash scripts/loader-failures-before.sh [commit]
# Needs this checkout's .venv. The old tree is a temporary detached worktree (removed on exit);
# its interpreter is a temporary venv that sees this venv's packages and runs the OLD start-up
# .pth line (failures 11 and 12 are about that line). Release-free: no SGL_ACCEL_TEST_SGLANG.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BEFORE=${1:-2c76e5c}
PY="$ROOT/.venv/bin/python"
WORK=$(mktemp -d /tmp/loader-before.XXXXXX)
TREE="$WORK/tree"
git -C "$ROOT" worktree add --detach "$TREE" "$BEFORE" >/dev/null 2>&1
trap 'git -C "$ROOT" worktree remove --force "$TREE"; rm -rf "$WORK"' EXIT

"$("$PY" -c 'import sys; print(sys.base_prefix)')/bin/python3" -m venv --without-pip "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("site-packages")))' > "$SITE/_packages.pth"
cp "$(find "$TREE/sgl_accel" -name sgl_accel_startup.pth | head -1)" "$SITE/"
OLD=(env $(env | grep -o '^SGL_ACCEL[A-Z_]*' | sed 's/^/-u /' || true) PYTHONPATH="$TREE" "$WORK/venv/bin/python")

cp "$ROOT/tests/test_loader_failures.py" "$TREE/tests/"
cat > "$TREE/tests/test_probe_before.py" <<'PROBE'
import importlib, logging
import pytest
from test_loader import _originals, _is_patched, demo  # noqa: F401
import sgl_accel
from sgl_accel import _loader


def test_probe_4_interrupted_swap(demo, monkeypatch):
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
    restored = all(_originals(module)[k] is v for k, v in before.items())
    status = sgl_accel.status(["demo-patch"])["demo-patch"]
    again = sgl_accel.apply(["demo-patch"])["demo-patch"]
    print(f"\nPROBE 4: targets restored={restored}; status {status.state}: {status.reason!r}; later apply {again.state}, patched={_is_patched(module)}")


def test_probe_7_repatched_by_another_library(demo, caplog):
    module = importlib.import_module(demo)
    sgl_accel.apply(["demo-patch"])

    def theirs(v):
        return -v

    module.scale = theirs
    with caplog.at_level(logging.WARNING, logger="sgl_accel"):
        report = sgl_accel.revert(["demo-patch"])["demo-patch"]
    again = sgl_accel.apply(["demo-patch"])["demo-patch"]
    print(f"\nPROBE 7: revert {report.state}: {report.reason!r}; theirs kept={module.scale is theirs}; logged={caplog.text.strip()!r}; later apply {again.state}: {again.reason!r}")
PROBE

cd "$TREE"
export COLUMNS=240  # the one-line reasons in the summary
echo "== tests/test_loader_failures.py on $BEFORE"
"${OLD[@]}" -m pytest -p no:cacheprovider tests/test_loader_failures.py -rA --tb=no -q 2>&1 | grep -E '^(PASSED|FAILED|ERROR)' | cut -c1-220 || true
echo "== probes on $BEFORE"
"${OLD[@]}" -m pytest -p no:cacheprovider tests/test_probe_before.py -q -s 2>&1 | grep '^PROBE' || true
count=$(SGL_ACCEL=1 SGL_ACCEL_VERIFY=maybe SGL_ACCEL_HARDWARE=cpu "${OLD[@]}" -c 'import sgl_accel; sgl_accel.status()' 2>&1 | grep -c 'SGL_ACCEL_VERIFY' || true)
echo "PROBE 10: SGL_ACCEL_VERIFY=maybe -> $count warning line(s) naming it"
echo "PROBE 10: how $BEFORE reads SGL_ACCEL_VERIFY: $(grep -rhn 'SGL_ACCEL_VERIFY", ""' sgl_accel/_loader.py | sed 's/^ *//')"
