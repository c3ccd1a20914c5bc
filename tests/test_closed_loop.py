"""experiments/closed_loop.py --quick end to end: every remedy trained or applied, re-diagnosed,
one table row each, and the numbers the remedies fix by construction checked."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
VALUE_INTERVAL = re.compile(rf"^({NUM}) \[({NUM}), ({NUM})\]$")


def _table_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[1].startswith("|---"), "the second table line is the header rule"
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def _check_numbers(text: str) -> None:
    """Every `value [lo, hi]` in a cell parses to finite numbers with lo ≤ hi (a percentile
    bootstrap interval need not contain the estimate, e.g. for the upward-biased ECE)."""
    found = re.findall(rf"({NUM}) \[({NUM}), ({NUM})\]", text)
    assert found, f"no value [lo, hi] in {text!r}"
    for value, lo, hi in found:
        v, a, b = float(value), float(lo), float(hi)
        assert all(math.isfinite(x) for x in (v, a, b)), text
        assert a <= b, text
    for bad in ("nan", "n/a", "None"):
        assert bad not in text, text


@pytest.mark.slow
def test_closed_loop_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "closed_loop.py"), "--quick"]
        + ["--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _table_rows((tmp_path / "closed_loop.md").read_text())
    assert len(rows) == 5
    assert [r[0][:2] for r in rows] == ["1.", "2.", "3.", "4.", "5."]
    for variant, metric, _findings, top1, verdict in rows:
        assert VALUE_INTERVAL.match(top1), f"{variant}: top-1 cell {top1!r}"
        _check_numbers(metric)
        assert verdict, variant

    doc = json.loads((tmp_path / "closed_loop.json").read_text())
    v = doc["variants"]
    # The fixed head is an exact simplex ETF, so the classifier probe's ETF distance is ~0,
    # against ~0.5 for a learned or random head.
    etf = v["etf"]["diagnosis"]["results"]["classifier"]["metrics"]["w_etf"]
    assert etf < 1e-6
    # Temperature scaling folds 1/T into the head: T finite, argmax (top-1) untouched.
    cal = v["calibrated"]
    assert math.isfinite(cal["calibrate"]["temperature"]) and cal["calibrate"]["temperature"] > 0
    top1 = cal["diagnosis"]["results"]["eval"]["metrics"]["top1"]
    assert top1 == v[cal["base"]]["diagnosis"]["results"]["eval"]["metrics"]["top1"]
