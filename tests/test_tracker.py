"""vitdiag.Tracker inside a training loop: it measures what `report` measures on the checkpoint
saved at that step, it logs the same numbers everywhere, and it changes nothing about training
(the weights and the optimizer of a run with it are bit-identical to a run without it)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS

import vitdiag
from vitdiag.engine import unchanged
from vitdiag.errors import VitdiagError
from vitdiag.runner import run_all
from vitdiag.tracker import CSV_NAME, flatten

PROBES = ["eval", "collapse", "similarity"]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
# How the tiny model is fed, and what its saved config.json records: the module's own
# pretrained_cfg (ImageNet, 224 px) is not it, so the Tracker is given this.
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": MEAN,
    "std": STD,
    "crop_pct": 1.0,
    "interpolation": "bicubic",
}


def tiny_model(seed: int = 0, drop: float = 0.0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        drop_rate=drop,
        drop_path_rate=drop,
        **TINY_ARGS,
    )


def train_images(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    ds = torchvision.datasets.ImageFolder(str(folder))
    tf = torchvision.transforms.Compose(
        [torchvision.transforms.Resize(32), torchvision.transforms.ToTensor()]
    )
    x = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
    return (x - 0.5) / 0.25, torch.tensor(ds.targets)


def train(model, opt, images, labels, epochs, tracker=None, save=None):
    """A seeded loop that draws from every global generator (torch: shuffling and noise,
    NumPy: flips, Python: a per-epoch scale) and trains with dropout and drop-path on."""
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(images))
        scale = 1.0 + 0.1 * random.random()
        for b in range(0, len(images), 4):
            idx = perm[b : b + 4]
            x = images[idx] * scale + 0.01 * torch.randn_like(images[idx])
            if np.random.rand() < 0.5:
                x = x.flip(-1)
            loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if save is not None:
            save(epoch)
        if tracker is not None:
            tracker.step(epoch)


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(image_folder, epochs=3, use_tracker=True, save=None, **tracker_args):
    seed_all()
    model = tiny_model(drop=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = train_images(image_folder)
    tracker = None
    if use_tracker:
        args = {"probes": PROBES, "data_config": DATA_CONFIG, "batch_size": 5, **tracker_args}
        tracker = vitdiag.Tracker(model, str(image_folder), **args)
    train(model, opt, images, labels, epochs, tracker, save)
    return model, opt, tracker


def save_checkpoint(model: torch.nn.Module, out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, out / "model.safetensors")
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 3,
        "model_args": dict(TINY_ARGS),
        "pretrained_cfg": {**DATA_CONFIG, "crop_mode": "center", "num_classes": 3},
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def rows_equal(one: dict, two: dict) -> list:
    assert one.keys() == two.keys()
    return [(k, one[k], two[k]) for k in one if not same(one[k], two[k])]


# -- training is unchanged ----------------------------------------------------------------------


def test_training_with_the_tracker_is_bit_identical_to_training_without(image_folder):
    plain_model, plain_opt, _ = run(image_folder, use_tracker=False)
    after_plain = (random.random(), float(np.random.rand()), torch.rand(1).item())
    model, opt, tracker = run(image_folder, use_tracker=True, every=1)
    after_tracked = (random.random(), float(np.random.rand()), torch.rand(1).item())

    assert [r["step"] for r in tracker.history] == [0, 1, 2]
    # The probes really ran and saw different weights each epoch.
    assert tracker.history[0]["collapse.nc1"] != tracker.history[2]["collapse.nc1"]
    assert after_tracked == after_plain  # every global generator is where the loop left it
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(p.grad, q.grad), name
    assert model.training and all(m.training for m in model.modules())
    state, plain_state = opt.state_dict(), plain_opt.state_dict()
    assert state["param_groups"] == plain_state["param_groups"]
    assert state["state"].keys() == plain_state["state"].keys()
    for key, value in state["state"].items():
        assert torch.equal(value["momentum_buffer"], plain_state["state"][key]["momentum_buffer"])


def test_unchanged_gives_back_grads_and_with_placement_the_same_tensors():
    model = tiny_model()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    params = list(model.parameters())
    before = [(p.data_ptr(), p.dtype, p.grad) for p in params]
    buffers = [b for b in model.buffers()]
    with unchanged(model, placement=True):
        model.zero_grad(set_to_none=True)
        model.double()
        assert params[0].dtype == torch.float64
    assert list(model.parameters()) == params  # the Parameter objects an optimizer holds
    assert [(p.data_ptr(), p.dtype, p.grad) for p in params] == before
    assert all(a is b for a, b in zip(model.buffers(), buffers, strict=True))
    with unchanged(model):
        model.zero_grad(set_to_none=True)
    assert all(p.grad is g for p, (_, _, g) in zip(params, before, strict=True))


def test_a_tracker_that_moves_the_model_gives_it_back_as_it_was(image_folder):
    model = tiny_model()
    params = list(model.parameters())
    ptrs = [p.data_ptr() for p in params]
    # channels_last re-lays the patch embedding's 4-d weight out in new memory, as a move to
    # another device would: afterwards the loop's optimizer must still hold the model's tensors.
    tracker = vitdiag.Tracker(
        model, str(image_folder), probes=["eval"], data_config=DATA_CONFIG, channels_last=True
    )
    tracker.step(0)
    assert list(model.parameters()) == params
    assert [p.data_ptr() for p in params] == ptrs
    assert model.patch_embed.proj.weight.is_contiguous()


# -- the numbers are report's numbers -------------------------------------------------------------


def test_history_equals_run_all_on_the_checkpoint_saved_at_that_step(image_folder, tmp_path):
    # run_all is the one path `vitdiag report` takes; the checkpoint goes through vitdiag.load.
    saved = {}

    def save(epoch):
        model = current["model"]
        saved[epoch] = save_checkpoint(model, tmp_path / f"epoch{epoch}")

    current = {}
    seed_all()
    model = tiny_model(drop=0.2)
    current["model"] = model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = train_images(image_folder)
    tracker = vitdiag.Tracker(
        model, str(image_folder), probes=PROBES, limit=10, data_config=DATA_CONFIG, batch_size=4
    )
    train(model, opt, images, labels, 2, tracker, save)

    assert [r["step"] for r in tracker.history] == [0, 1]
    for row in tracker.history:
        loaded = vitdiag.load(str(saved[row["step"]]))
        results = run_all(
            loaded, str(image_folder), probes=PROBES, limit=10, batch_size=4, device="cpu"
        )
        expected = {"step": row["step"], **flatten(results)}
        assert len(expected) > 10
        assert rows_equal(row, expected) == []

    # And through the command line, as a user would check a saved checkpoint.
    from typer.testing import CliRunner

    from vitdiag.cli import app

    last = tracker.history[-1]
    out = tmp_path / "cli"
    args = ["report", str(saved[last["step"]]), "--data", str(image_folder)]
    args += ["--probes", ",".join(PROBES), "--limit", "10", "--batch-size", "4"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--no-plots", "--quiet"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    cli = {f"{r['probe']}.{k}": v for r in doc["results"] for k, v in r["metrics"].items()}
    for key, value in cli.items():
        mine = last[key]
        assert (value is None and math.isnan(mine)) or value == mine, (key, value, mine)
    assert set(cli) == set(last) - {"step"}


# -- logging -------------------------------------------------------------------------------------


def read_log(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (folder / CSV_NAME).open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def test_csv_and_writer_get_the_numbers_of_the_history(image_folder, tmp_path):
    calls = []
    model = tiny_model()
    tracker = vitdiag.Tracker(
        model,
        str(image_folder),
        probes=["eval", "similarity"],
        every=2,
        data_config=DATA_CONFIG,
        log_dir=tmp_path / "log",
        writer=lambda step, metrics: calls.append((step, metrics)),
        tensorboard=False,
    )
    for step in range(4):
        out = tracker.step(step)
        assert (out is None) == (step % 2 == 1)
        with torch.no_grad():
            model.head.weight.mul_(0.5)  # something to measure changing
    assert [r["step"] for r in tracker.history] == [0, 2]
    assert [s for s, _ in calls] == [0, 2]

    columns, rows = read_log(tmp_path / "log")
    keys = [k for k in tracker.history[0] if k != "step"]
    assert columns == ["step", *keys]
    assert "eval.top1" in keys and "similarity.last_block" in keys
    assert tracker.history[0]["eval.nll"] != tracker.history[1]["eval.nll"]
    for row, hist, (_, written) in zip(rows, tracker.history, calls, strict=True):
        assert int(row["step"]) == hist["step"]
        assert rows_equal(written, {k: v for k, v in hist.items() if k != "step"}) == []
        logged = {k: float(v) for k, v in row.items() if k != "step"}
        assert rows_equal(logged, {k: float(v) for k, v in written.items()}) == []
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == [CSV_NAME]


def test_an_earlier_log_is_continued_and_a_new_metric_widens_the_header(image_folder, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    # A resumed run: the earlier run logged steps 0..2 with one metric only.
    (log / CSV_NAME).write_text("step,eval.top1,old.metric\n0,0.25,1.5\n1,0.5,\n2,0.75,2.5\n")
    tracker = vitdiag.Tracker(
        tiny_model(), str(image_folder), probes=["eval"], data_config=DATA_CONFIG, log_dir=log,
        tensorboard=False,
    )  # fmt: skip
    tracker.step(2)  # redoes step 2: the old row 2 goes
    tracker.step(3)
    columns, rows = read_log(log)
    assert columns[:3] == ["step", "eval.top1", "old.metric"]
    assert columns[3:] == [k for k in tracker.history[0] if k not in ("step", "eval.top1")]
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0]["eval.top1"] == "0.25" and rows[0]["eval.nll"] == ""
    assert rows[2]["old.metric"] == ""
    assert float(rows[2]["eval.nll"]) == tracker.history[0]["eval.nll"]
    assert not [p.name for p in log.iterdir() if p.name != CSV_NAME]  # no temporary file left


def test_tensorboard_scalars_when_tensorboard_is_installed(image_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = vitdiag.Tracker(
        tiny_model(), str(image_folder), probes=["eval"], data_config=DATA_CONFIG, log_dir=tmp_path
    )
    tracker.step(0)
    tracker.step(1)
    tracker.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    top1 = events.Scalars("eval/top1")
    assert [e.step for e in top1] == [0, 1]
    for event, row in zip(top1, tracker.history, strict=True):
        assert event.value == pytest.approx(row["eval.top1"], rel=1e-6)


def test_bad_arguments_are_one_sentence_errors(image_folder):
    model = tiny_model()
    with pytest.raises(VitdiagError, match="every="):
        vitdiag.Tracker(model, str(image_folder), every=0, data_config=DATA_CONFIG)
    with pytest.raises(VitdiagError, match="unknown option"):
        vitdiag.Tracker(model, str(image_folder), data_config=DATA_CONFIG, batchsize=4)
    with pytest.raises(VitdiagError, match="unknown probe"):
        vitdiag.Tracker(model, str(image_folder), probes=["nope"], data_config=DATA_CONFIG)
    with pytest.raises(VitdiagError, match="labelled"):
        vitdiag.Tracker(model, "synthetic:8", probes=["collapse"], data_config=DATA_CONFIG)


# -- torchrun ------------------------------------------------------------------------------------

SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import test_tracker as t

folder, out = sys.argv[1], sys.argv[2]
rank = os.environ.get("RANK", "0")
calls = []
model, opt, tracker = t.run(
    t.Path(folder), epochs=2, probes=t.PROBES, log_dir=out + "/log", batch_size=2,
    writer=lambda step, metrics: calls.append(step),
)
with open(out + f"/rank{{rank}}.json", "w") as fh:
    json.dump({{"history": tracker.history, "calls": calls}}, fh)
"""


@pytest.mark.slow
def test_two_processes_track_what_one_process_tracks(image_folder, tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    script = tmp_path / "track.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(image_folder), str(one)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(image_folder), str(two)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    single = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Every rank got the numbers; rank 0 alone logged them.
    assert single["calls"] == ranks[0]["calls"] == [0, 1] and ranks[1]["calls"] == []
    assert ranks[0]["history"] == ranks[1]["history"]
    logged = sorted(p.name for p in (two / "log").iterdir())
    boards = [n for n in logged if n.startswith("events.out.tfevents.")]
    # one CSV and, with tensorboard installed, one events file: one process wrote
    assert [n for n in logged if n not in boards] == [CSV_NAME]
    assert len(boards) == (importlib.util.find_spec("tensorboard") is not None)
    for a, b in zip(single["history"], ranks[0]["history"], strict=True):
        assert a.keys() == b.keys()
        off = {
            k: (v, b[k])
            for k, v in a.items()
            if not same(v, b[k]) and not math.isclose(v, b[k], rel_tol=1e-6, abs_tol=1e-12)
        }
        assert not off, off
    columns, rows = read_log(two / "log")
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert float(rows[1]["collapse.nc1"]) == ranks[0]["history"][1]["collapse.nc1"]
