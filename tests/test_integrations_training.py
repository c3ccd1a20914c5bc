"""Training-framework callbacks (Lightning, transformers.Trainer): they log what a direct
`vitdiag` measurement of the same weights gives, and they change nothing about training (the
weights and the global random states after a fit are bit-identical to a fit without them)."""

from __future__ import annotations

import csv
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
from tolerances import FORWARD_RTOL

import vitdiag
from vitdiag.errors import VitdiagError
from vitdiag.tracker import finite_metrics

pl = pytest.importorskip("lightning.pytorch")

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "fixtures" / "data" / "train"
VAL = ROOT / "fixtures" / "data" / "val"
MODEL = ROOT / "fixtures" / "models" / "vit_nomix"
PROBES = ["eval", "collapse"]
LIMIT = 40
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
# How the tiny models are fed in these tests; their own pretrained_cfg (ImageNet, 224 px) is not.
DATA_CONFIG = {"input_size": (3, 32, 32), "mean": MEAN, "std": STD, "crop_pct": 1.0}


def train_set(per_class: int = 4) -> torch.utils.data.TensorDataset:
    """The first `per_class` training images of each class at 32 px, normalised."""
    import torchvision

    ds = torchvision.datasets.ImageFolder(str(TRAIN))
    tf = torchvision.transforms.Compose(
        [torchvision.transforms.Resize((32, 32)), torchvision.transforms.ToTensor()]
    )
    keep = [
        i for c in range(10) for i in [j for j, t in enumerate(ds.targets) if t == c][:per_class]
    ]
    x = torch.stack([tf(ds[i][0]) for i in keep])
    y = torch.tensor([ds.targets[i] for i in keep])
    return torch.utils.data.TensorDataset((x - 0.5) / 0.25, y)


def tiny_vit() -> torch.nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=10,
        drop_rate=0.1,
        drop_path_rate=0.1,
    )


class Module(pl.LightningModule):
    """A timm ViT as `self.model`; each step draws from every global generator (torch:
    dropout and shuffling, NumPy: a flip, Python: a scale) so a leak of any would show."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x * (1.0 + 0.1 * random.random())
        if np.random.rand() < 0.5:
            x = x.flip(-1)
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def fit(tmp: Path, callback=None, epochs: int = 2):
    """A seeded deterministic CPU fit of the tiny ViT; (model, trainer, RNG states after)."""
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(0, verbose=False)
    model = tiny_vit()
    loader = torch.utils.data.DataLoader(train_set(), batch_size=8, shuffle=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        deterministic=True,
        logger=CSVLogger(str(tmp), name="run", version=0),
        callbacks=[callback] if callback is not None else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(model), loader)
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    return model, trainer, states


def callback(**kw):
    from vitdiag.integrations.lightning import VitdiagCallback

    args = dict(probes=PROBES, data=str(TRAIN), val=str(VAL), limit=LIMIT)
    return VitdiagCallback(**{**args, **kw}, data_config=DATA_CONFIG)


def direct(model: torch.nn.Module) -> dict[str, float]:
    """The same measurement without any callback: a Tracker built on the final weights."""
    tracker = vitdiag.Tracker(
        model, str(TRAIN), PROBES, val=str(VAL), limit=LIMIT, data_config=DATA_CONFIG
    )
    tracker.step(0)
    return finite_metrics({k: v for k, v in tracker.history[-1].items() if k != "step"})


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightning")
    # 3 epochs, measured after epoch 2 only: epoch 3 trains after a measurement, so anything
    # the measurement changed (a weight, a mode, a random draw) would show in the final weights.
    cb = callback(every_n_epochs=2)
    with_cb = fit(tmp / "with", cb, epochs=3)
    without = fit(tmp / "without", epochs=3)
    return tmp, cb, with_cb, without


def test_lightning_callback_changes_nothing_about_training(lightning_runs):
    _, cb, (model, _, states), (plain, _, plain_states) = lightning_runs
    assert len(cb.history) == 1  # it did measure, mid-fit
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not changed, changed
    assert torch.equal(states[0], plain_states[0])
    assert states[1][0] == plain_states[1][0] and np.array_equal(states[1][1], plain_states[1][1])
    assert states[1][2:] == plain_states[1][2:]
    assert states[2] == plain_states[2]


def test_lightning_metrics_reach_the_logger_as_measured_directly(lightning_runs):
    tmp, cb, _, _ = lightning_runs
    with (tmp / "with" / "run" / "version_0" / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    # every_n_epochs=2 over 3 epochs of 5 steps: one row, at the global step after epoch 2
    assert [int(r["step"]) for r in rows] == [10]
    model, trainer, _ = fit(tmp / "two_epochs", epochs=2)  # the same weights, the same seed
    assert trainer.global_step == 10
    expected = direct(model)
    assert {"eval.top1", "collapse.nc1"} <= expected.keys()
    logged = {k: float(v) for k, v in rows[0].items() if k not in ("step", "epoch") and v != ""}
    assert logged.keys() == expected.keys()
    # the same float32 kernels on the same batches in one process: equal, not just close
    assert logged == expected
    assert cb.history[0]["step"] == 10 and cb.history[0]["epoch"] == 1


def test_lightning_model_choice(tmp_path):
    from vitdiag.integrations.lightning import measured_module

    vit = tiny_vit()
    assert measured_module(Module(vit), None) is vit
    assert measured_module(Module(vit), "model") is vit
    two = Module(vit)
    two.other = tiny_vit()
    with pytest.raises(VitdiagError, match="model_attr"):
        measured_module(two, None)
    with pytest.raises(VitdiagError, match="model_attr"):
        measured_module(Module(vit), "missing")


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [("lightning", "lightning.pytorch", "lightning"), ("transformers", "transformers", "hf")],
)
def test_a_missing_framework_is_one_line_naming_the_extra(monkeypatch, module, blocked, extra):
    import importlib

    monkeypatch.delitem(sys.modules, f"vitdiag.integrations.{module}", raising=False)
    monkeypatch.setitem(sys.modules, blocked, None)  # what an absent package looks like
    with pytest.raises(VitdiagError, match=rf"install vitdiag\[{extra}\]\.$"):
        importlib.import_module(f"vitdiag.integrations.{module}")


DDP_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
import vitdiag
from vitdiag.integrations.lightning import VitdiagCallback

devices, out = int(sys.argv[1]), sys.argv[2]
model = vitdiag.load(sys.argv[3]).model.train()


class Module(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        # lr 0: the weights stay the fixture's, so 1 and 2 processes measure the same weights
        return torch.optim.SGD(self.parameters(), lr=0.0)


pl.seed_everything(0, verbose=False)
data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
cb = VitdiagCallback(probes=sys.argv[4], data=sys.argv[5], val=sys.argv[6], limit=int(sys.argv[7]))
trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                     max_epochs=1, logger=False, enable_checkpointing=False, callbacks=[cb],
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Module(model), torch.utils.data.DataLoader(data, batch_size=2))
with open(f"{out}.{trainer.global_rank}.json", "w") as fh:
    json.dump({"world": trainer.world_size, "history": cb.history}, fh)
"""


@pytest.mark.slow
def test_lightning_ddp_two_processes_match_one(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    tail = [str(MODEL), "eval,collapse", str(TRAIN), str(VAL), "24"]
    one = [sys.executable, str(script), "1", str(tmp_path / "one"), *tail]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two += [str(script), "2", str(tmp_path / "two"), *tail]
    for cmd in (one, two):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    single = json.loads((tmp_path / "one.0.json").read_text())
    rank0 = json.loads((tmp_path / "two.0.json").read_text())
    rank1 = json.loads((tmp_path / "two.1.json").read_text())
    assert (single["world"], rank0["world"]) == (1, 2)
    assert rank0["history"] == rank1["history"]  # every rank gets the all-reduced numbers
    (a,), (b,) = single["history"], rank0["history"]
    assert a.keys() == b.keys() and {"eval.top1", "collapse.nc1", "collapse.nc4"} <= a.keys()
    # 8 images, batch 2: 4 steps on one process, 2 per rank on two
    assert (a["step"], b["step"], a["epoch"], b["epoch"]) == (4, 2, 0, 0)
    assert a["eval.n_images"] == a["collapse.n"] == 24.0
    for key in a.keys() - {"step", "epoch"}:
        if key in COUNTS:
            assert a[key] == b[key], key  # counts and ratios of counts are exact
        else:  # FORWARD_RTOL, with its absolute floor for differences of unit-scale terms
            assert math.isclose(a[key], b[key], rel_tol=FORWARD_RTOL, abs_tol=FORWARD_RTOL), key


COUNTS = {
    f"{probe}.{name}"
    for probe, names in {
        "eval": ("n_images", "n_labelled", "top1", "majority_rate"),
        "collapse": (
            "n",
            "classes",
            "dim",
            "nc4_sample_size",
            "nc4_population",
            "nc4",
            "nc4_nobias",
        ),
    }.items()
    for name in names
}


def tiny_hf_vit(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    # transformers.Trainer refuses to start without accelerate (its `transformers[torch]`)
    pytest.importorskip("accelerate")
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=10,
        hidden_dropout_prob=0.1,
    )
    return transformers.ViTForImageClassification(config)


class HfImages(torch.utils.data.Dataset):
    """The training images as the Trainer wants them, normalised as transformers ViT's
    image-processor default (mean 0.5, std 0.5), which `vitdiag load` assumes too."""

    def __init__(self) -> None:
        x, self.y = train_set(per_class=1).tensors
        self.x = x * 0.25 / 0.5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def hf_fit(tmp: Path, callback=None):
    import transformers

    transformers.set_seed(0)
    model = tiny_hf_vit()
    args = transformers.TrainingArguments(
        output_dir=str(tmp),
        use_cpu=True,
        report_to=[],
        max_steps=2,
        per_device_train_batch_size=10,
        learning_rate=1e-3,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    callbacks = [callback] if callback is not None else []
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=HfImages(), callbacks=callbacks
    )
    trainer.train()
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    return model, trainer, states


def test_hf_trainer_callback_changes_nothing_and_logs_what_a_saved_checkpoint_gives(tmp_path):
    from vitdiag.integrations.transformers import VitdiagTrainerCallback
    from vitdiag.runner import Settings, open_source, run_all
    from vitdiag.tracker import flatten

    # reference_images=0: no random-init reference pass; it fills `extra`, not the metrics
    cb = VitdiagTrainerCallback(
        probes=PROBES, data=str(TRAIN), val=str(VAL), limit=LIMIT, reference_images=0
    )
    model, trainer, states = hf_fit(tmp_path / "with", cb)
    plain, _, plain_states = hf_fit(tmp_path / "without")
    ours, theirs = model.state_dict(), plain.state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not changed, changed
    assert torch.equal(states[0], plain_states[0])
    assert np.array_equal(states[1][1], plain_states[1][1]) and states[1][2:] == plain_states[1][2:]
    assert states[2] == plain_states[2]

    # 10 images, batch 10, max_steps 2: two epochs of one step, measured after each, so the
    # second step trains after a measurement and would show anything it changed
    logged = [e for e in trainer.state.log_history if "eval.top1" in e]
    assert [(e["step"], e["epoch"]) for e in logged] == [(1, 1.0), (2, 2.0)]
    assert trainer.state.global_step == 2
    # independent path: the checkpoint save_pretrained writes, loaded as `vitdiag report` does
    model.save_pretrained(tmp_path / "saved")
    settings = Settings(limit=LIMIT, device="cpu", reference_images=0)
    loaded = vitdiag.load(tmp_path / "saved")
    results = run_all(
        loaded,
        open_source(str(TRAIN), settings),
        probes=PROBES,
        val_source=open_source(str(VAL), settings),
        settings=settings,
    )
    expected = finite_metrics(flatten(results))
    got = {k: v for k, v in logged[-1].items() if k not in ("step", "epoch")}
    assert got.keys() == expected.keys() and {"eval.top1", "collapse.nc1"} <= got.keys()
    # the same timm model on the same batches in one process: equal, not just close
    assert got == expected
