"""`vitdiag augment --suggest`: each flag's train.py change, audited again with its effect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitdiag.cli import app

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.slow
def test_each_suggestion_clears_its_flag_and_brings_the_ratio_towards_one():
    args = ["augment", "--data", str(FIXTURES / "data" / "val")]
    args += ["--ckpt", str(FIXTURES / "models" / "vit_mixup"), "--reprob", "0.25"]
    args += ["--remode", "const", "--limit", "64", "--suggest", "--json", "-", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    audit = json.loads(result.stdout)["results"][0]
    rows = {r["flag"]: r for r in audit["extra"]["suggestions"]}
    # vit_mixup's args.yaml has Mixup 0.8; --remode const is asked for here.
    assert set(rows) == {"mixup", "erasing-mode"}
    assert rows["mixup"]["change"].startswith("--mixup 0 --cutmix")
    assert rows["erasing-mode"]["change"].startswith("--remode pixel --mean ")
    for row in rows.values():
        assert row["flag_after"] == 0.0, row
        assert abs(row["after"] - 1) < abs(row["before"] - 1), row
    # What the findings say about the same audit: one finding per flag, with the change.
    from vitdiag.findings import evaluate

    doc = {"results": [audit], "model": {"path": None}}
    fired = {f.rule: f for f in evaluate(doc)}
    assert set(fired) == {"augment.mixup", "augment.erasing-mode"}
    assert fired["augment.mixup"].value == pytest.approx(audit["metrics"]["ratio_x_global/mixup"])
