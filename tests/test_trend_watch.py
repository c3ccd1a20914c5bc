"""`vitdiag trend --watch DIR`: following a training folder while train.py writes into it.

The checkpoints are saved by timm's own CheckpointSaver (what train.py uses: checkpoint-N.pth.tar
plus last.pth.tar), then copied into the watched folder while `vitdiag trend --watch` runs as a
real subprocess, so the polling, the file checks and Ctrl-C are the real ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import FIXTURES, ROOT
from vitdiag.cli import app
from vitdiag.studies.trend import Watcher

VAL = str(FIXTURES / "data" / "val")
NOMIX = FIXTURES / "models" / "vit_nomix"
MEASURE = ["--data", VAL, "--limit", "16", "--batch-size", "16", "--probes", "eval"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    import timm
    import yaml
    from safetensors.torch import load_file
    from timm.utils import CheckpointSaver

    out = tmp_path_factory.mktemp("saved")
    args = argparse.Namespace(**yaml.safe_load((NOMIX / "args.yaml").read_text()))
    model = timm.create_model(args.model, num_classes=10, img_size=32, **args.model_kwargs)
    trained = load_file(NOMIX / "model.safetensors")
    saver = CheckpointSaver(
        model, torch.optim.SGD(model.parameters(), lr=0.1), args=args, checkpoint_dir=str(out)
    )
    g = torch.Generator().manual_seed(0)
    for epoch in range(2):
        noise = (1 - epoch) * 0.1
        model.load_state_dict(
            {k: v + noise * torch.randn(v.shape, generator=g) for k, v in trained.items()}
        )
        saver.save_checkpoint(epoch)
    return out


def _watch(folder: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "vitdiag", "trend", "--watch", str(folder), *MEASURE]
    cmd += ["--poll", "0.2", "--out", str(out), *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _rows(out: Path) -> list[dict]:
    """trend.json's rows, [] while there is none (it is written whole or not at all)."""
    path = out / "trend.json"
    return json.loads(path.read_text())["runs"][0]["rows"] if path.is_file() else []


def _wait(proc: subprocess.Popen, out: Path, n: int, grow=None, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while len(_rows(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"no {n} row(s) in {timeout} s"
        if grow is not None:
            grow()
        time.sleep(0.05)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def watching(tmp_path_factory):
    """`trend --watch` on a folder still empty, started before `saved` (pytest sets up
    module fixtures in argument order) so that its imports overlap the saving."""
    base = tmp_path_factory.mktemp("watch")
    run, out, doc = base / "run", base / "out", base / "trend.json"
    run.mkdir()
    proc = _watch(run, out, "--json", str(doc))
    yield proc, run, out, doc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_a_growing_file_waits_each_is_measured_once_and_ctrl_c_writes_all(watching, saved):
    proc, run, out, doc = watching
    shutil.copy(saved / "checkpoint-0.pth.tar", run)
    shutil.copy(saved / "last.pth.tar", run)  # train.py's copy: never a row of its own
    full = (saved / "checkpoint-1.pth.tar").read_bytes()
    growing = run / "checkpoint-1.pth.tar"
    growing.write_bytes(full[: len(full) // 2])
    written = [len(full) // 2]

    def grow() -> None:  # 256 bytes every 50 ms, faster than the 0.2 s poll: never stable
        with open(growing, "ab") as fh:
            fh.write(full[written[0] : written[0] + 256])
        written[0] += 256
        assert written[0] < len(full), "the file finished growing before the test could look"

    _wait(proc, out, 1, grow)
    until = time.monotonic() + 1.0  # over 4 polls while it still grows: still one row
    while time.monotonic() < until:
        grow()
        time.sleep(0.05)
    assert [r["label"] for r in _rows(out)] == ["checkpoint-0.pth.tar"]
    with open(growing, "ab") as fh:
        fh.write(full[written[0] :])
    _wait(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 0, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped watching"), stderr
    rows = _rows(out)
    assert [(r["label"], r["epoch"]) for r in rows] == [
        ("checkpoint-0.pth.tar", 0),
        ("checkpoint-1.pth.tar", 1),
    ]
    assert json.loads(doc.read_text())["runs"][0]["rows"] == rows
    # measured exactly once each, and checkpoint-1 as the complete file
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("measured")] == [
        "checkpoint-0.pth.tar",
        "checkpoint-1.pth.tar",
    ]
    assert rows[1]["model"]["sha256"] == _sha(saved / "checkpoint-1.pth.tar")
    assert "checkpoint-1.pth.tar" in (out / "trend.md").read_text()
    assert {"trend.json", "trend.md", "eval.top1.png", "eval.nll.png"} <= {
        p.name for p in out.iterdir()
    }
    # no temporary file or folder left beside the outputs or in them
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "run", "trend.json"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_max_checkpoints_ends_it_and_the_numbers_are_trends(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved, run)  # all there at the start: measured first, in epoch order
    (run / "checkpoint-9.pth.tar").write_bytes(b"")  # empty: train.py has just opened it
    runner = CliRunner()
    watch = ["trend", "--watch", str(run), *MEASURE, "--poll", "0.05", "--no-plots"]
    got = runner.invoke(app, [*watch, "--max-checkpoints", "2", "--json", str(tmp_path / "w")])
    assert got.exit_code == 0, got.output
    assert got.output.count("measured ") == 2
    rows = json.loads((tmp_path / "w").read_text())["runs"][0]["rows"]
    ref = tmp_path / "ref.json"
    got = runner.invoke(app, ["trend", str(saved), *MEASURE, "--quiet", "--json", str(ref)])
    assert got.exit_code == 0, got.output
    want = json.loads(ref.read_text())["runs"][0]["rows"]
    assert (
        [r["label"] for r in rows]
        == [r["label"] for r in want]
        == [
            "checkpoint-0.pth.tar",
            "checkpoint-1.pth.tar",
        ]
    )
    for a, b in zip(rows, want, strict=True):
        assert a["metrics"]["eval.top1"] == pytest.approx(b["metrics"]["eval.top1"], abs=1e-6)
        assert a["metrics"]["eval.nll"] == pytest.approx(b["metrics"]["eval.nll"], rel=1e-5)


def test_the_watcher_gives_a_file_once_when_it_stops_changing_and_reads(saved, tmp_path):
    full = (saved / "checkpoint-0.pth.tar").read_bytes()
    path = tmp_path / "checkpoint-0.pth.tar"
    path.write_bytes(full[:1000])
    shutil.copy(saved / "last.pth.tar", tmp_path)  # train.py's copy: never given
    w = Watcher(tmp_path)
    assert w.complete() == []  # first look: nothing has been seen twice
    assert w.complete() == []  # unchanged but unreadable: noted, not given
    assert len(w.notes) == 1 and "checkpoint-0.pth.tar" in w.notes[0]
    assert w.complete() == []  # and not tried again while it stays the same
    assert len(w.notes) == 1
    path.write_bytes(full)
    assert w.complete() == []  # changed since the last look
    assert w.complete() == [(path, 0, True)]
    assert w.complete() == []  # given once
