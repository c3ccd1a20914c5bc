"""A finding, the context its remedy needs, and the evidence rule that caps its severity.

Rules are pure functions of the results document (what `vitdiag report --out` writes): they
read a probe's metrics, its `extra.intervals` and `extra.references` (docs/FINDINGS.md), never
the model, so a saved report can be judged again without it.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

INFO, WARN, FAIL = "info", "warn", "fail"
SEVERITIES = (INFO, WARN, FAIL)


@dataclass
class Finding:
    """One statement about the model, with the evidence behind it (docs/FINDINGS.md)."""

    rule: str  # stable dotted id, e.g. "calibration.over_confident"
    severity: str  # info | warn | fail
    value: float | None
    interval: list[float] | None  # [lo, hi]
    interval_method: str | None
    reference: dict[str, Any]  # {value, interval, how}
    message: str  # one sentence a user can act on
    remedy: str | None  # a command line that runs as printed, a vitdiag.train function, or None
    checkpoint: str | None = None  # the report's label of the checkpoint it is about

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    """What a remedy needs to be a command that runs as printed: where the inputs were."""

    checkpoint: str | None  # the checkpoint path (None: random weights)
    label: str | None
    data: str | None  # --data as given
    val: str | None  # --val as given
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def command(self, *words: Any) -> str:
        return shlex.join(str(w) for w in words)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def interval_of(result: dict, key: str) -> tuple[list[float] | None, str | None]:
    """([lo, hi], method) of a metric's interval in a result, or (None, None)."""
    entry = (result.get("extra") or {}).get("intervals", {}).get(key)
    if not entry or not finite(entry.get("lo")) or not finite(entry.get("hi")):
        return None, None
    return [float(entry["lo"]), float(entry["hi"])], entry.get("method")


def reference_of(result: dict, name: str) -> dict | None:
    ref = (result.get("extra") or {}).get("references", {}).get(name)
    return dict(ref) if ref else None


def overlaps(interval: list[float] | None, ref: dict) -> bool:
    """Whether an interval overlaps the reference's interval (or contains its value)."""
    if interval is None:
        return True
    ref_lo, ref_hi = ref.get("interval") or [ref.get("value"), ref.get("value")]
    if not finite(ref_lo) or not finite(ref_hi):
        return True
    return interval[0] <= ref_hi and ref_lo <= interval[1]


def graded(excludes: bool, effect: float, practical: float) -> str:
    """SPEC §8's cap: info unless the interval excludes the reference; fail only when it does
    and the effect exceeds the rule's practical size."""
    if not excludes:
        return INFO
    return FAIL if finite(effect) and abs(effect) > practical else WARN


def short(x: Any) -> str:
    return f"{x:.4g}" if finite(x) else "n/a"


def span(interval: list[float] | None) -> str:
    return f"[{short(interval[0])}, {short(interval[1])}]" if interval else "(no interval)"
