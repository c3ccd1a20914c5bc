"""`vitdiag check` on findings: `findings.max_severity < fail`, `findings.RULE absent|present`.

RULE is a rule id (`calibration.over_confident`) or a glob over ids (`variance.rescale_helps@*`,
`calibration.*`). Severities order as none < info < warn < fail.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from vitdiag.errors import VitdiagError
from vitdiag.findings.base import SEVERITIES

LEVELS = ("none", *SEVERITIES)
_MAX = re.compile(
    r"^\s*findings\.max_severity\s*(?P<op><=|>=|<|>|==)\s*(?P<level>none|info|warn|fail)\s*$"
)
_RULE = re.compile(r"^\s*findings\.(?P<rule>[A-Za-z_][\w.@*?\-/]*)\s+(?P<want>absent|present)\s*$")
# the probe each family of rules reads (a rule id starts with its family)
RULE_PROBES = {
    "eval": "eval",
    "calibration": "calibration",
    "variance": "variance",
    "similarity": "similarity",
    "collapse": "collapse",
    "classifier": "classifier",
}


@dataclass(frozen=True)
class FindingCheck:
    """A check on the findings of the run, judged like a threshold."""

    text: str
    kind: str  # "max_severity" or "rule"
    op: str = ""  # max_severity: <, <=, >, >=, ==
    level: str = ""
    rule: str = ""  # a rule id or glob
    want: str = ""  # "absent" or "present"
    line: int | None = None
    probe: str = "findings"

    @property
    def metric(self) -> str:
        return "findings.max_severity" if self.kind == "max_severity" else f"findings.{self.rule}"

    def expected(self) -> str:
        return f"{self.op} {self.level}" if self.kind == "max_severity" else self.want

    def probes(self) -> set[str] | None:
        """The probes whose findings this reads (None: every probe)."""
        return None if self.kind == "max_severity" else {RULE_PROBES[self.rule.split(".")[0]]}

    def judge(self, findings: list[dict]) -> tuple[float, bool, str]:
        """(measured, passed, measured as shown) against the run's findings."""
        if self.kind == "max_severity":
            worst = max((LEVELS.index(f["severity"]) for f in findings), default=0)
            wanted = LEVELS.index(self.level)
            passed = {
                "<": worst < wanted,
                "<=": worst <= wanted,
                ">": worst > wanted,
                ">=": worst >= wanted,
                "==": worst == wanted,
            }[self.op]
            return float(worst), passed, LEVELS[worst]
        hits = [f["rule"] for f in findings if fnmatch.fnmatchcase(f["rule"], self.rule)]
        passed = not hits if self.want == "absent" else bool(hits)
        return float(len(hits)), passed, ", ".join(hits) or "absent"


def parse_finding_check(text: str, where: str, line: int | None = None) -> FindingCheck:
    if m := _MAX.match(text):
        return FindingCheck(text, "max_severity", op=m["op"], level=m["level"], line=line)
    if m := _RULE.match(text):
        family = m["rule"].split(".")[0]
        if family not in RULE_PROBES:
            raise VitdiagError(
                f"{where}: {text!r} names no rule family vitdiag check runs; rules start with "
                f"{', '.join(RULE_PROBES)} (e.g. findings.calibration.over_confident absent)."
            )
        return FindingCheck(text, "rule", rule=m["rule"], want=m["want"], line=line)
    raise VitdiagError(
        f"{where}: {text!r} is not a findings check; write findings.max_severity < fail "
        "(none, info, warn, fail) or findings.RULE absent|present (RULE an id or a glob)."
    )
