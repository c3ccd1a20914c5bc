"""MLflow and W&B writers: the same names and values as the Tracker's CSV, read back from the
stores themselves (an MLflow file store, a W&B offline run file), not from what was sent."""

from __future__ import annotations

import glob
import json
import math
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import FIXTURES
from vitdiag.cli import app
from vitdiag.integrations.mlflow import MlflowWriter
from vitdiag.integrations.wandb import WandbWriter
from vitdiag.tracker import CsvLog, board_name, finite_metrics, read_csv

STEPS = [
    (0, {"eval.top1": 0.25, "collapse.nc1": 3.5, "similarity.block1.mean": 0.125}),
    (1, {"eval.top1": 0.5, "collapse.nc1": float("nan"), "similarity.block1.mean": None}),
    (4, {"eval.top1": 0.875, "collapse.nc1": 1.0625, "similarity.block1.mean": 0.375}),
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


@pytest.fixture(autouse=True)
def file_store(monkeypatch):
    # MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true before it writes a local file store
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def csv_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    _, rows = read_csv(path)
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, cell in row.items():
            if key != "step" and cell:
                out.setdefault(key, []).append((int(row["step"]), float(cell)))
    return out


def mlflow_series(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    names = client.get_run(run_id).data.metrics
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in names}


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's .wandb file: W&B's LevelDB-style log of protobufs
    (a 7-byte file header, 32 KiB blocks, each chunk crc32/length/type then its bytes)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(pb.Record.FromString(buf))
            buf = b""
    return records


def wandb_series(root: Path) -> dict[str, list[tuple[int, float]]]:
    (run_dir,) = (Path(p) for p in glob.glob(str(root / "wandb" / "offline-run-*")))
    out: dict[str, list[tuple[int, float]]] = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
        }
        if "_step" not in items:  # W&B's own bookkeeping rows carry no metric
            assert all(k.startswith("_") for k in items), items
            continue
        for key, value in items.items():
            if not key.startswith("_"):
                out.setdefault(key, []).append((items["_step"], float(value)))
    return out


def test_every_writer_logs_the_csvs_names_and_values(tmp_path, offline):
    uri = f"file://{tmp_path}/mlruns"
    csv, ml, wb = CsvLog(tmp_path / "log.csv"), MlflowWriter(tracking_uri=uri), WandbWriter()
    for step, metrics in STEPS:
        csv.write(step, metrics)
        ml(step, metrics)
        wb(step, metrics)
    ml.close()
    wb.close()
    expected = csv_series(tmp_path / "log.csv")
    # NaN and None were not measured: no writer shows a point for them
    assert expected["collapse.nc1"] == [(0, 3.5), (4, 1.0625)]
    assert expected["similarity.block1.mean"] == [(0, 0.125), (4, 0.375)]
    assert mlflow_series(uri, ml.run_id) == expected
    assert wandb_series(tmp_path) == expected


def test_the_one_naming_rule():
    assert finite_metrics({"a.b": 1, "c.d": math.inf, "e.f": None, "g.h": 0.5}) == {
        "a.b": 1.0,
        "g.h": 0.5,
    }
    assert board_name("similarity.block1.mean") == "similarity/block1.mean"


def test_tracker_feeds_mlflow_the_csvs_numbers(tmp_path):
    import timm
    import torch

    import vitdiag

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2,
        embed_dim=32, num_heads=2,
    )  # fmt: skip
    uri = f"file://{tmp_path}/mlruns"
    writer = MlflowWriter(tracking_uri=uri)
    tracker = vitdiag.Tracker(
        model, str(FIXTURES / "data" / "val"), probes=["eval", "collapse"], limit=20,
        log_dir=tmp_path / "log", writer=writer, tensorboard=False,
    )  # fmt: skip
    for step in (0, 1):
        tracker.step(step)
    tracker.close()
    expected = csv_series(tmp_path / "log" / "vitdiag_tracker.csv")
    assert "eval.top1" in expected and "collapse.nc1" in expected
    assert mlflow_series(uri, writer.run_id) == expected


def test_trend_from_log_logs_to_mlflow_and_wandb(tmp_path, offline):
    log = tmp_path / "log"
    csv = CsvLog(log / "vitdiag_tracker.csv")
    log.mkdir()
    for step, metrics in STEPS:
        csv.write(step, metrics)
    uri = f"file://{tmp_path}/mlruns"
    got = CliRunner().invoke(
        app,
        ["trend", "--from-log", str(log), "--out", str(tmp_path / "t"), "--no-plots",
         "--mlflow", uri, "--wandb", "p", "--wandb-mode", "offline"],
    )  # fmt: skip
    assert got.exit_code == 0, got.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vitdiag-trend").experiment_id])
    expected = csv_series(log / "vitdiag_tracker.csv")
    assert mlflow_series(uri, run.info.run_id) == expected
    assert wandb_series(tmp_path) == expected


def test_a_file_store_without_the_opt_in_is_one_sentence(tmp_path, monkeypatch):
    from vitdiag.errors import VitdiagError

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    with pytest.raises(VitdiagError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        MlflowWriter(tracking_uri=f"file://{tmp_path}/mlruns")


def test_a_bad_wandb_mode_is_one_line(tmp_path):
    got = CliRunner().invoke(
        app, ["trend", "--from-log", str(tmp_path), "--wandb", "p", "--wandb-mode", "sideways"]
    )
    assert got.exit_code == 2 and got.output.strip().startswith("error: --wandb-mode")
