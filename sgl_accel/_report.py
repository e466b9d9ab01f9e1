"""Reports: per patch a state and a one-line reason, printable as a table or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from ._decide import State, TargetState

# applied         every target of an applicable part was rewritten
# pending-import  waiting for sglang to import the target modules
# upstream        the installed sglang already contains the change
# not-applicable  a gate does not hold (hardware, kernels, release, feature)
# skipped         not applied on purpose: drifted or wrapped source, disabled, untested, not requested
# failed          an error while applying; every target was restored
# A plan (sgl-accel status/plan, the scanner) says "applies" where apply() would say "applied".
STATES = tuple(s.value for s in State if s is not State.APPLIES)
PLAN_STATES = ("applies", "upstream", "not-applicable", "skipped")


@dataclass
class TargetReport:
    target: str  # module:qualname
    state: TargetState  # see _decide.TargetState
    reason: str = ""
    fingerprint: Optional[str] = None

    def __post_init__(self):
        self.state = TargetState(self.state)


@dataclass
class PatchReport:
    name: str
    state: str
    reason: str
    kind: str = ""
    upstream_pr: str = ""
    parts: dict = field(default_factory=dict)  # part name -> state
    targets: list = field(default_factory=list)  # TargetReport
    opt_in: bool = False  # applied only when named (see Patch.opt_in)

    def __post_init__(self):
        self.state = State(self.state)  # ValueError for an unknown state


@dataclass
class Report:
    patches: list  # PatchReport
    sglang: str = ""
    hardware: str = ""
    version: str = ""

    def __getitem__(self, name: str) -> PatchReport:
        for patch in self.patches:
            if patch.name == name:
                return patch
        raise KeyError(name)

    def __iter__(self):
        return iter(self.patches)

    def __len__(self):
        return len(self.patches)

    def states(self) -> dict:
        return {p.name: p.state for p in self.patches}

    def to_dict(self) -> dict:
        return {
            "sgl_accel": self.version,
            "sglang": self.sglang,
            "hardware": self.hardware,
            "patches": [asdict(p) for p in self.patches],
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """One line, e.g. "applied 2/5 on sglang 0.5.11 (ascend 910B3); 3 not-applicable"."""
        counts: dict = {}
        for patch in self.patches:
            counts[patch.state] = counts.get(patch.state, 0) + 1
        applied = counts.pop("applied", 0)
        rest = "; ".join(f"{n} {state}" for state, n in counts.items())
        line = f"sgl-accel {self.version}: applied {applied}/{len(self.patches)} on {self.sglang} ({self.hardware})"
        return line + (f"; {rest}" if rest else "")

    def table(self) -> str:
        header = ("patch", "state", "kind", "upstream", "reason")
        rows = [(p.name, p.state, p.kind + (" opt-in" if p.opt_in else ""), p.upstream_pr, p.reason) for p in self.patches]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
        lines = [f"sgl-accel {self.version} on {self.sglang} ({self.hardware})"]
        for row in [header, *rows]:
            lines.append("  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths)) + "  " + str(row[4]))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
