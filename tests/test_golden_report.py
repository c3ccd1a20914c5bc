"""The full `vitdiag report` JSON of each fixture model, pinned number by number.

This guards refactoring: moving code must not move a number. The golden files are
regenerated only on purpose, when a number is meant to change:

    VITDIAG_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden_report.py

Threads are pinned to one so that floating-point reduction order, and with it the last bits,
does not depend on the machine's core count.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vitdiag.cli import app

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
MODELS = ("vit_nomix", "vit_mixup", "vit_cutmix")
RTOL = 1e-12
# Values that describe the run, not the model: wall time, the package version, where the
# data lives on this machine.
VOLATILE = {("run", "seconds"), ("vitdiag_version",)}


def _volatile(path: tuple) -> bool:
    names = tuple(p for p in path if isinstance(p, str))
    return names in VOLATILE or names[-1:] in {("path",), ("resolved_path",)}


def _compare(got, want, path: tuple = ()) -> list[str]:
    where = "/".join(map(str, path)) or "(root)"
    if _volatile(path):
        return []
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            missing = sorted(set(want) - set(got or {}))
            added = sorted(set(got or {}) - set(want))
            return [f"{where}: keys differ, missing {missing}, added {added}"]
        return [m for k in want for m in _compare(got[k], want[k], (*path, k))]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: list length {len(got or [])} != {len(want)}"]
        pairs = enumerate(zip(got, want, strict=True))
        return [m for i, (g, w) in pairs for m in _compare(g, w, (*path, i))]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if math.isclose(got, want, rel_tol=RTOL, abs_tol=1e-300):
            return []
        return [f"{where}: {got!r} != {want!r}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def _report(model: str, out: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(
            app,
            [
                "report",
                f"fixtures/models/{model}",
                "--data",
                "fixtures/data/val",
                "--sizes",
                "48",
                "--out",
                str(out),
                "--no-plots",
                "--quiet",
            ],
        )
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_report_json_equals_golden(model, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    got = _report(model, tmp_path / "report")
    golden = GOLDEN / f"report_{model}.json"
    if os.environ.get("VITDIAG_REGEN_GOLDEN") == "1":
        golden.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(golden.read_text())
    problems = _compare(got, want)
    assert not problems, "\n".join(problems[:30])


def test_comparison_catches_a_changed_number_and_a_missing_key():
    want = {"results": [{"metrics": {"nc1": 0.25, "top1": 1.0}}], "run": {"seconds": 3.0}}
    same = {"results": [{"metrics": {"nc1": 0.25 * (1 + 1e-14), "top1": 1.0}}], "run": {}}
    assert _compare(same, want) == ["run: keys differ, missing ['seconds'], added []"]
    moved = {"results": [{"metrics": {"nc1": 0.25 + 1e-9, "top1": 1.0}}], "run": {"seconds": 9}}
    assert _compare(moved, want) == [f"results/0/metrics/nc1: {0.25 + 1e-9!r} != 0.25"]
    fewer = {"results": [{"metrics": {"nc1": 0.25}}], "run": {"seconds": 1.0}}
    assert "keys differ" in _compare(fewer, want)[0]
