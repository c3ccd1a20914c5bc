"""`vitdiag trend`: the probes over a run's checkpoints, in epoch order, with one model.

The run is saved the way timm's train.py saves it, by timm's own CheckpointSaver (a dict with
'state_dict', 'epoch', 'arch', 'args' as an argparse.Namespace, plus last.pth.tar), from the
fixture model's weights perturbed less and less each epoch.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tests.conftest import FIXTURES, save_tiny_vit
from vitdiag.cli import app
from vitdiag.studies.trend import BY_EPOCH, BY_GIVEN, BY_NAME, order_checkpoints

runner = CliRunner()
TRAIN, VAL = str(FIXTURES / "data" / "train"), str(FIXTURES / "data" / "val")
NOMIX = FIXTURES / "models" / "vit_nomix"
PROBES = "eval,calibration,classifier,collapse,similarity,variance"
COMMON = ["--limit", "24", "--batch-size", "12", "--quiet"]


def invoke(args: list[str]):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory) -> Path:
    import timm
    import yaml
    from safetensors.torch import load_file
    from timm.utils import CheckpointSaver

    out = tmp_path_factory.mktemp("timm_run")
    args = argparse.Namespace(**yaml.safe_load((NOMIX / "args.yaml").read_text()))
    model = timm.create_model(args.model, num_classes=10, img_size=32, **args.model_kwargs)
    trained = load_file(NOMIX / "model.safetensors")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(out))
    g = torch.Generator().manual_seed(0)
    for epoch in range(3):
        noise = (2 - epoch) * 0.05
        model.load_state_dict(
            {k: v + noise * torch.randn(v.shape, generator=g) for k, v in trained.items()}
        )
        saver.save_checkpoint(epoch)
    shutil.copy(NOMIX / "args.yaml", out / "args.yaml")  # train.py writes it beside them
    return out


def _results(doc: dict) -> dict[str, dict]:
    out = {}
    for r in doc["results"]:
        r = dict(r)
        r["extra"] = {k: v for k, v in r["extra"].items() if k != "checkpoint"}
        out[r["probe"]] = r
    return out


def test_trend_equals_a_separate_report_on_each_checkpoint(timm_run, tmp_path):
    got = invoke(
        ["trend", timm_run, "--data", TRAIN, "--val", VAL, "--probes", PROBES, "--sizes", "48",
         *COMMON, "--out", tmp_path / "t", "--json", tmp_path / "t.json"]
    )  # fmt: skip
    assert got.exit_code == 0, got.output
    doc = json.loads((tmp_path / "t.json").read_text())
    assert json.loads((tmp_path / "t" / "trend.json").read_text()) == doc
    (run,) = doc["runs"]
    assert run["order_by"] == BY_EPOCH
    rows = run["rows"]
    # last.pth.tar repeats epoch 2: a folder scan leaves timm's aliases out
    assert [Path(r["path"]).name for r in rows] == [f"checkpoint-{e}.pth.tar" for e in range(3)]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["model_reused"] for r in rows] == [False, True, True]
    assert rows[0]["metrics"]["eval.top1"] < rows[2]["metrics"]["eval.top1"]
    for row in rows:
        ckpt = Path(row["path"])
        rep = invoke(
            ["report", ckpt, "--data", TRAIN, "--val", VAL, "--probes", PROBES, "--sizes", "48",
             *COMMON, "--no-plots", "--out", tmp_path / f"r-{ckpt.name}",
             "--json", tmp_path / f"{ckpt.name}.json"]
        )  # fmt: skip
        assert rep.exit_code == 0, rep.output
        report = json.loads((tmp_path / f"{ckpt.name}.json").read_text())
        expected = _results(report)
        assert _results({"results": row["results"]}) == expected  # every number, every table
        flat = {f"{p}.{k}": v for p, r in expected.items() for k, v in r["metrics"].items()}
        assert row["metrics"] == flat
        assert row["model"]["sha256"] == report["model"]["sha256"]


def _save_pickle(path: Path, epoch: int | None, key: str = "state_dict") -> Path:
    obj = {key: {"w": torch.zeros(2)}, "args": argparse.Namespace(model="x")}
    if epoch is not None:
        obj["epoch"] = epoch
    torch.save(obj, path)
    return path


def test_order_by_recorded_epoch_over_the_file_name(tmp_path):
    # names say 9, 1, 5; the recorded epochs say 2, 0, 1 (DeiT's 'model' key for one)
    a = _save_pickle(tmp_path / "ckpt-9.pth", 2)
    b = _save_pickle(tmp_path / "ckpt-1.pth", 0, key="model")
    c = _save_pickle(tmp_path / "ckpt-5.pth", 1)
    ordered, how, _ = order_checkpoints([a, b, c])
    assert how == BY_EPOCH
    assert ordered == [(b, 0), (c, 1), (a, 2)]


def test_order_by_file_name_number_when_epochs_are_not_recorded(tmp_path):
    paths = []
    for n in (10, 2, 33):  # natural order 2 < 10 < 33, not the string order
        p = tmp_path / f"epoch{n}.safetensors"
        save_file({"w": torch.zeros(2)}, p)
        paths.append(p)
    ordered, how, _ = order_checkpoints(paths)
    assert how == BY_NAME
    assert [e for _, e in ordered] == [2, 10, 33]
    # one file that records an epoch does not decide for the others
    mixed = [_save_pickle(tmp_path / "x-7.pth", 0), *paths]
    ordered, how, notes = order_checkpoints(mixed)
    assert how == BY_NAME and [e for _, e in ordered] == [2, 7, 10, 33] and notes


def test_order_given_when_nothing_orders_them(tmp_path):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    for p in (first, second):
        save_file({"w": torch.zeros(2)}, p)
    ordered, how, notes = order_checkpoints([second, first])
    assert how == BY_GIVEN and ordered == [(second, None), (first, None)] and notes


def test_two_runs_share_each_plot(timm_run, tmp_path):
    early = f"early={timm_run}/checkpoint-[01].pth.tar"
    late = f"late={timm_run}/checkpoint-2.pth.tar"
    got = invoke(
        ["trend", "--run", early, "--run", late, "--data", VAL, "--probes", "classifier,eval",
         *COMMON, "--out", tmp_path / "t"]
    )  # fmt: skip
    assert got.exit_code == 0, got.output
    doc = json.loads((tmp_path / "t" / "trend.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["early", "late"]
    assert [[row["epoch"] for row in r["rows"]] for r in doc["runs"]] == [[0, 1], [2]]
    names = {p.name for p in (tmp_path / "t").iterdir()}
    assert {"overview.png", "eval.top1.png", "classifier.w_etf.png"} <= names
    assert "collapse.png" not in names  # not measured: no empty figure
    md = (tmp_path / "t" / "trend.md").read_text()
    assert "## early" in md and "## late" in md and "![top-1](eval.top1.png)" in md


def test_architectures_that_differ_are_loaded_separately(tmp_path):
    other = save_tiny_vit(tmp_path / "tiny_epoch5", num_classes=10)
    got = invoke(
        ["trend", NOMIX, other, "--probes", "classifier", "--quiet", "--no-plots",
         "--json", tmp_path / "t.json"]
    )  # fmt: skip
    assert got.exit_code == 0, got.output
    (run,) = json.loads((tmp_path / "t.json").read_text())["runs"]
    assert run["order_by"] == BY_GIVEN  # vit_nomix has no number in its name
    assert [r["model_reused"] for r in run["rows"]] == [False, False]
    assert any("loaded separately" in n for n in run["notes"])
    from vitdiag.model import load
    from vitdiag.runner import run_all

    alone = run_all(load(other), None, probes={"classifier"})
    assert run["rows"][1]["metrics"]["classifier.w_etf"] == alone[0].metrics["w_etf"]


HEADER = (
    "step,eval.top1,calibration.ece,collapse.nc1,classifier.w_etf,"
    "similarity.embed.mean,similarity.block1.mean,similarity.last_block"
)
CSV = (
    HEADER
    + """
0,0.2,0.30,0.9,0.61,0.50,0.55,0.55
1,0.6,,0.5,0.58,0.52,0.60,0.60
2,0.9,0.05,0.2,0.55,0.51,0.66,0.66
"""
)


def test_from_log_draws_a_trackers_csv(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vitdiag_tracker.csv").write_text(CSV)
    got = invoke(["trend", "--from-log", tmp_path / "a", "--out", tmp_path / "one"])
    assert got.exit_code == 0, got.output
    (run,) = json.loads((tmp_path / "one" / "trend.json").read_text())["runs"]
    assert [r["epoch"] for r in run["rows"]] == [0, 1, 2]
    assert run["rows"][1]["metrics"]["calibration.ece"] is None  # empty cell: not measured
    assert run["rows"][2]["metrics"]["collapse.nc1"] == 0.2
    names = {p.name for p in (tmp_path / "one").iterdir()}
    assert {"overview.png", "similarity_heatmap.png", "eval.top1.png"} <= names
    got = invoke(
        ["trend", "--from-log", "--run", f"a={tmp_path / 'a'}", "--run", f"b={tmp_path / 'b'}",
         "--out", tmp_path / "two"]
    )  # fmt: skip
    assert got.exit_code == 0, got.output
    doc = json.loads((tmp_path / "two" / "trend.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["a", "b"]
    assert {"similarity_heatmap-a.png", "similarity_heatmap-b.png"} <= {
        p.name for p in (tmp_path / "two").iterdir()
    }


@pytest.mark.parametrize(
    "case",
    ["no-match", "empty-folder", "unreadable", "bad-csv", "no-csv", "run-syntax", "both"],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    garbage = tmp_path / "checkpoint-3.pth.tar"
    garbage.write_bytes(b"not a checkpoint at all")
    bad_csv = tmp_path / "log"
    bad_csv.mkdir()
    (bad_csv / "vitdiag_tracker.csv").write_text("step,eval.top1\n0,abc\n")
    data = ["--data", VAL, "--probes", "eval", "--out", out]
    args = {
        "no-match": ["trend", str(tmp_path / "nothing-*.pth"), *data],
        "empty-folder": ["trend", tmp_path / "empty", *data],
        "unreadable": ["trend", garbage, *data],
        "bad-csv": ["trend", "--from-log", bad_csv, "--out", out],
        "no-csv": ["trend", "--from-log", tmp_path / "empty", "--out", out],
        "run-syntax": ["trend", "--run", "nameless", *data],
        "both": ["trend", garbage, "--run", f"a={garbage}", *data],
    }[case]
    got = invoke(args)
    assert got.exit_code == 2, got.output
    lines = got.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), got.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["empty", "checkpoint-3.pth.tar", "log"]
    )


# --------------------------------------------------------------------------- issue 21, category 7


def test_a_trend_across_architectures_is_refused_naming_both(tmp_path):
    other = save_tiny_vit(tmp_path / "small_epoch5", num_classes=10)
    config = json.loads((other / "config.json").read_text())
    config["architecture"] = "vit_small_patch16_224"  # same args: the weights still fit
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "t"
    got = invoke(["trend", NOMIX, other, "--probes", "classifier", "--quiet", "--out", out])
    assert got.exit_code == 2, got.output
    (line,) = got.output.strip().splitlines()
    assert line.startswith("error: ") and "vit_small_patch16_224" in line
    assert "vit_tiny_patch16_224" in line and "small_epoch5" in line and "vit_nomix" in line
    from vitdiag.errors import VitdiagError
    from vitdiag.studies.trend import trend_run

    with pytest.raises(VitdiagError) as caught:
        trend_run("", [NOMIX, other], None, probes={"classifier"})
    assert f"error: {caught.value}" == line


def test_an_empty_glob_is_one_line_and_the_api_says_the_same(tmp_path):
    from vitdiag.errors import VitdiagError
    from vitdiag.studies.trend import find_checkpoints

    pattern = str(tmp_path / "checkpoint-*.pth.tar")
    got = invoke(["trend", pattern, "--data", VAL, "--probes", "eval", "--out", tmp_path / "o"])
    assert got.exit_code == 2, got.output
    (line,) = got.output.strip().splitlines()
    assert f"no checkpoints matched {pattern}" in line
    with pytest.raises(VitdiagError) as caught:
        find_checkpoints([pattern])
    assert line == f"error: {caught.value}"


def test_a_run_folder_with_only_last_is_a_one_row_trend_with_a_note(timm_run, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(timm_run / "last.pth.tar", folder / "last.pth.tar")
    got = invoke(
        ["trend", folder, "--data", VAL, "--probes", "eval", *COMMON, "--no-plots",
         "--json", tmp_path / "t.json"]
    )  # fmt: skip
    assert got.exit_code == 0, got.output
    (run,) = json.loads((tmp_path / "t.json").read_text())["runs"]
    assert [r["label"] for r in run["rows"]] == ["last.pth.tar"]
    assert run["rows"][0]["epoch"] == 2  # the epoch last.pth.tar records
    assert any(n.startswith("only last.pth.tar") for n in run["notes"])
