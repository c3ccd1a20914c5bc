"""Each run option is declared once (on its `Settings` field): the command line, `vitdiag check`'s
config and the README's option table all read that declaration, so a `check` run and the
`report` run with the same options are the same run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vitdiag.runner
from vitdiag import settings as declared
from vitdiag.check import load_config, run_settings
from vitdiag.cli import app
from vitdiag.errors import VitdiagError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _numbers(doc: dict) -> dict[str, dict[str, float | None]]:
    """probe -> its metrics (NaN as None), the part of a JSON document that timings leave alone."""
    out = {}
    for r in doc["results"]:
        out[r["probe"]] = {
            k: None if v is None or isinstance(v, float) and math.isnan(v) else v
            for k, v in r["metrics"].items()
        }
    return out


def _recording(monkeypatch) -> list:
    """The Settings of every run_all call the commands make."""
    seen: list = []
    original = vitdiag.runner.run_all

    def run_all(*args, **kwargs):
        seen.append(kwargs["settings"])
        return original(*args, **kwargs)

    monkeypatch.setattr(vitdiag.runner, "run_all", run_all)
    return seen


def test_a_check_run_and_the_report_run_with_the_same_options_are_the_same_run(
    tmp_path, tiny_ckpt, image_folder, monkeypatch
):
    checks = ["eval.top1 >= 0", "similarity.last_block < 2", "variance.shift@48 within [0, 100]"]
    lines = ",\n".join(f'  "{c}"' for c in checks)
    cfg = tmp_path / "vitdiag.toml"
    cfg.write_text(
        f'data = "{image_folder}"\nbatch_size = 4\nerank_every = 2\nchecks = [\n{lines},\n]\n'
    )
    seen = _recording(monkeypatch)
    check_json, report_json = tmp_path / "check.json", tmp_path / "report.json"
    common = ["-q", "--device", "cpu"]
    done = runner.invoke(
        app, ["check", str(tiny_ckpt), "--config", str(cfg), "--json", str(check_json), *common]
    )
    assert done.exit_code == 0, done.output
    done = runner.invoke(
        app,
        ["report", str(tiny_ckpt), "--data", str(image_folder)]
        + ["--probes", "eval,similarity,variance", "--sizes", "48", "--batch-size", "4"]
        + ["--erank-every", "2", "--out", str(tmp_path / "r"), "--no-plots"]
        + ["--json", str(report_json), *common],
    )
    assert done.exit_code == 0, done.output
    # the same Settings object, the CLI's defaults included (workers: half the CPUs)
    assert len(seen) == 2 and seen[0] == seen[1]
    assert seen[0].workers == declared.cli_default("workers") and seen[0].erank_every == 2
    check_doc, report_doc = json.loads(check_json.read_text()), json.loads(report_json.read_text())
    assert _numbers(check_doc) == _numbers(report_doc)
    assert set(_numbers(check_doc)) == {"eval", "similarity", "variance"}
    assert check_doc["data"] == report_doc["data"]


def test_check_builds_its_settings_as_the_command_line_does(tmp_path):
    cfg = tmp_path / "vitdiag.toml"
    cfg.write_text(
        'data = "val"\nviews = 3\naug = ["mixup", "cutmix"]\nchecks = ["eval.top1 > 0"]\n'
    )
    got = run_settings(load_config(cfg), {"device": "cpu", "limit": None})
    want = declared.build_settings({"views": 3, "aug": "mixup,cutmix", "device": "cpu"})
    assert got == want
    # nothing given: exactly the command line's defaults, which differ from the library's
    # only where declared (quiet: a progress bar on the command line)
    plain = declared.build_settings({})
    assert plain == declared.Settings(quiet=False)
    assert {
        n for n in declared.options() if declared.cli_default(n) != declared.library_default(n)
    } == {"quiet"}


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("erank_every", "0", "erank_every must be at least 1"),
        ("workers", "-1", "workers must be 0 (load in this process) or more"),
        ("crop_pct", "1.5", "crop_pct must be a fraction in (0, 1]"),
        ("strict", "1", "strict must be true or false"),
        ("device", '"cpu"', "unknown key(s) device"),  # the command line's, not the config's
    ],
)
def test_a_config_value_is_checked_by_the_option_declaration(tmp_path, key, value, needle):
    cfg = tmp_path / "vitdiag.toml"
    cfg.write_text(f'{key} = {value}\nchecks = ["eval.top1 > 0"]\n')
    with pytest.raises(VitdiagError) as e:
        load_config(cfg)
    assert needle in str(e.value)


def test_every_option_is_declared_once_and_reaches_its_commands():
    import inspect

    import vitdiag.cli  # noqa: F401 - registers the commands
    from vitdiag.commands.report import report
    from vitdiag.commands.similarity import similarity

    flags = [opt.flag for opt in declared.options().values()]
    assert len(flags) == len(set(flags))
    params = inspect.signature(report).parameters
    assert {"erank_every", "layers", "aug", "views", "per_class", "nc4_budget"} <= set(params)
    assert params["erank_every"].default == declared.library_default("erank_every")
    assert {"erank_every", "layers"} <= set(inspect.signature(similarity).parameters)


def test_the_readme_option_table_is_the_generated_one():
    """Regenerate with `python -m vitdiag.settings --readme README.md`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert declared.readme_with_table(text) == text, (
        "README.md's option table is stale: run `python -m vitdiag.settings --readme README.md`"
    )


def test_the_table_command_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "vitdiag.settings"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == declared.option_table()
    assert "| `--erank-every` | `16` |" in out.stdout
