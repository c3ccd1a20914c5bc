"""Findings: what is wrong with the model, against a reference, with an interval, and the fix.

`evaluate(document)` applies every rule to a results document (what `vitdiag report --out`
writes; any command's `--json` document works too) and returns the findings, most severe
first. Rules are pure functions of the document, one module per probe; docs/FINDINGS.md gives
the schema and the evidence each probe writes.
"""

from __future__ import annotations

from collections.abc import Callable

from vitdiag.findings import accuracy, augment, calibration, collapse, similarity, variance
from vitdiag.findings.base import FAIL, INFO, SEVERITIES, WARN, Context, Finding

SCHEMA_VERSION = "findings-v1"
Rule = Callable[[dict, Context, "dict | None"], list[Finding]]
RULES: dict[str, tuple[Rule, ...]] = {
    accuracy.PROBE: (accuracy.rules,),
    calibration.PROBE: (calibration.rules,),
    variance.PROBE: (variance.rules,),
    similarity.PROBE: (similarity.rules,),
    "collapse": (collapse.nc1_rules, collapse.nc4_rules),
    "classifier": (collapse.head_rules,),
    augment.PROBE: (augment.rules,),
}

__all__ = [
    "FAIL",
    "INFO",
    "RULES",
    "SCHEMA_VERSION",
    "SEVERITIES",
    "WARN",
    "Context",
    "Finding",
    "evaluate",
    "findings_block",
    "max_severity",
]


def _source(data: dict | None, role: str) -> str | None:
    entry = (data or {}).get(role) or {}
    return entry.get("source") or entry.get("path")


def _contexts(doc: dict) -> dict[str | None, Context]:
    """The context of each checkpoint in the document, by its label."""
    data = doc.get("data") or {}
    if data and "n_images" in data:  # a single-dataset command's document
        data = {"data": data}
    models = [(c.get("label"), c.get("model") or {}) for c in doc.get("checkpoints", [])]
    if not models:
        models = [(None, doc.get("model") or {})]
    out = {}
    for label, model in models:
        out[label] = Context(
            checkpoint=model.get("path"),
            label=label,
            data=_source(data, "data"),
            val=_source(data, "val"),
            seed=int((data.get("data") or {}).get("seed") or 0),
            extra={"num_classes": model.get("num_classes")},
        )
    return out


def evaluate(doc: dict, practical: dict[str, float] | None = None) -> list[Finding]:
    """Every finding the rules draw from a results document, most severe first."""
    contexts = _contexts(doc)
    several = len(contexts) > 1
    found: list[Finding] = []
    for result in doc.get("results", []):
        label = (result.get("extra") or {}).get("checkpoint")
        ctx = contexts.get(label) or next(iter(contexts.values()))
        for rule in RULES.get(result.get("probe"), ()):
            for f in rule(result, ctx, practical):
                f.checkpoint = label if several else None
                found.append(f)
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(found, key=lambda f: (-rank[f.severity], f.checkpoint or "", f.rule))


def findings_block(findings: list[Finding]) -> dict:
    """The `findings` entry of report.json."""
    return {"schema_version": SCHEMA_VERSION, "items": [f.to_dict() for f in findings]}


def max_severity(findings: list[Finding] | list[dict]) -> str | None:
    """The most severe level among the findings (None when there are none)."""
    levels = [f["severity"] if isinstance(f, dict) else f.severity for f in findings]
    return max(levels, key=SEVERITIES.index) if levels else None
