#!/usr/bin/env bash
# The whole test suite: one release-free pass, then one pass per sglang release
# (a process can import only one sglang). Prints a closing "N passed, N failed" line.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/envs.sh || exit 1
RELEASES=${SGLANG_RELEASES:-"0.5.10.post1 0.5.11 0.5.12.post1 0.5.13.post1"}
out=.cache/junit
rm -rf "$out" && mkdir -p "$out"
status=0

run_pass() {  # name, then pytest arguments
    local name=$1; shift
    echo "=== pytest: $name"
    .venv/bin/python -m pytest -q -p no:cacheprovider --junitxml="$out/$name.xml" "$@"
    local rc=$?
    # 5 = this pass collected no test of its kind: not a failure.
    if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=1; fi
}

run_pass release-free -m "not sglang" "$@"
for v in $RELEASES; do
    SGL_ACCEL_TEST_SGLANG=$v run_pass "sglang-$v" -m sglang "$@"
done

.venv/bin/python - "$out" <<'PY'
import sys, pathlib, xml.etree.ElementTree as ET
total = dict(tests=0, failures=0, errors=0, skipped=0)
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")):
    for suite in ET.parse(f).getroot().iter("testsuite"):
        for k in total:
            total[k] += int(suite.get(k, 0))
failed = total["failures"] + total["errors"]
passed = total["tests"] - failed - total["skipped"]
print(f"total: {passed} passed, {failed} failed, {total['skipped']} skipped")
PY
exit $status
