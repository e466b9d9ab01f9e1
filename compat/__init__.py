"""The compatibility matrix: which sglang releases each patch applies to.

``matrix.json`` is produced by the scanner (``python -m sgl_accel.compat.scanner``,
``make compat``) from the real release wheels; never edit it by hand. At run time
it decides the tested-source policy: a target that passes the structural guard
but whose fingerprint no scanned release had is left alone unless untested
sources are allowed (``SGL_ACCEL_ALLOW_UNTESTED=1``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

MATRIX_PATH = Path(__file__).with_name("matrix.json")
# What apply() reads: the tested fingerprints of each target, derived from the matrix and
# written beside it by the scanner (parsing the 400 KB matrix cost every apply() 2-4 ms).
TESTED_PATH = Path(__file__).with_name("tested.json")

# The states of a matrix cell (release x patch), what each means to a user, and whether the
# user has the patch's benefit on that release (what `sgl-accel pin` counts).
STATE_MEANING = {
    "applies": "sgl-accel patches this release",
    "upstream": "the release already has the change (in the place the patch names or where a later release moved it)",
    "replaced": "the release replaced the target with other code that does the same job",
    "not-needed": "the release's own code is correct: the fix targets a state this release never had",
    "older-form": "the target exists in an older form that the patch was not written for",
    "not-applicable": "the release is outside the patch's range",
    "absent": "the code the patch changes does not exist in this release",
    "drifted": "the target exists with another shape; sgl-accel leaves it alone",
}
STATES = tuple(STATE_MEANING)
BENEFIT_STATES = ("applies", "upstream", "replaced", "not-needed")


@functools.lru_cache(maxsize=1)
def load_matrix() -> dict:
    try:
        return json.loads(MATRIX_PATH.read_text())
    except FileNotFoundError:
        return {"releases": [], "patches": [], "matrix": {}}


def matrix_state(report) -> str:
    """Fold a plan report (see _plan.plan_patch) into a matrix state, judged from the source only
    (the scanner then applies the release range and the feature gate's kind, see scanner.cell)."""
    targets = [t.state for t in report.targets]
    if "older-form" in targets and "upstream" not in targets:
        return "older-form"
    if report.state in ("applies", "upstream", "not-applicable"):
        return report.state
    if "replaced" in targets and set(targets) <= {"replaced", "upstream"}:
        return "replaced"
    # Part of the feature missing, none of it upstream: the code the patch needs is not there.
    if "absent" in targets and "upstream" not in targets:
        return "absent"
    return "drifted"


def tested_index(matrix: dict) -> dict:
    """{``module:qualname``: sorted fingerprints that passed the guard in some scanned release}."""
    seen: dict = {}
    for row in matrix.get("matrix", {}).values():
        for entry in row.values():
            for key, target in entry.get("targets", {}).items():
                if target.get("state") == "applies" and target.get("fingerprint"):
                    seen.setdefault(key, set()).add(target["fingerprint"])
    return {key: sorted(seen[key]) for key in sorted(seen)}


@functools.lru_cache(maxsize=1)
def _tested() -> dict:
    try:
        return json.loads(TESTED_PATH.read_text())
    except (FileNotFoundError, ValueError):  # an install without it: the long way
        return tested_index(load_matrix())


def is_tested(target_key: str, fingerprint: str) -> bool:
    """Whether ``module:qualname`` had this fingerprint and passed the guard in a scanned release."""
    return fingerprint in _tested().get(target_key, ())
