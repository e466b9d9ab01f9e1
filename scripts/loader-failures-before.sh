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
# Probes: run the new test as far as it goes on the old loader, then look at what it left.
cat > "$TREE/tests/test_probe_before.py" <<'PROBE'
import importlib
import test_loader_failures as new
from test_loader import _is_patched, demo  # noqa: F401
import sgl_accel


def _stopped_at(test, *args) -> str:
    try:
        test(*args)
    except AssertionError as exc:
        return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:160]
    return "nothing (the test passed)"


def test_probe_4_interrupted_swap(demo, monkeypatch):
    # The test's first check (every target restored) passes or it would stop there.
    stopped = _stopped_at(new.test_4_keyboard_interrupt_during_the_swap_restores_every_target, demo, monkeypatch)
    status = sgl_accel.status(["demo-patch"])["demo-patch"]
    again = sgl_accel.apply(["demo-patch"])["demo-patch"]
    print(f"\nPROBE 4: test stopped at {stopped!r}; status {status.state}: {status.reason!r}; later apply {again.state}, patched={_is_patched(importlib.import_module(demo))}")


def test_probe_7_repatched_by_another_library(demo, caplog):
    stopped = _stopped_at(new.test_7_revert_leaves_another_librarys_function_and_a_later_apply_decides_afresh, demo, caplog)
    module = importlib.import_module(demo)
    again = sgl_accel.apply(["demo-patch"])["demo-patch"]
    print(f"\nPROBE 7: test stopped at {stopped!r}; other library's function kept={module.scale.__name__ == 'theirs'}; logged={caplog.text.strip()!r}; later apply {again.state}: {again.reason!r}")
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
