"""Measuring changes nothing: after every command that takes a model, each parameter and buffer
is bit-identical to what was loaded, every module keeps its train/eval flag, and the global
random number generators are where the caller left them.

The commands run for real; the test only keeps a reference to each model `vitdiag.model.load`
returns, to compare it afterwards.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from typer.testing import CliRunner

import vitdiag.model
from vitdiag.cli import app
from vitdiag.engine import unchanged

runner = CliRunner()
NOMIX = str(FIXTURES / "models" / "vit_nomix")
TRAIN = str(FIXTURES / "data" / "train")
VAL = str(FIXTURES / "data" / "val")
SMALL = ["--limit", "8", "--batch-size", "4", "--device", "cpu", "-q"]
# a CNN with BatchNorm, small enough for the CPU: train-mode forwards would move its buffers
RESNET = ["--arch", "resnet10t", "--model-arg", "num_classes=10"]


def _state(model: torch.nn.Module) -> dict:
    tensors = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
    tensors.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
    return {
        "tensors": tensors,
        "training": {name: m.training for name, m in model.named_modules()},
    }


def _differences(model: torch.nn.Module, before: dict) -> list[str]:
    after = _state(model)
    out = [
        name
        for name, value in before["tensors"].items()
        if name not in after["tensors"] or not torch.equal(after["tensors"][name].cpu(), value)
    ]
    out += [f"training:{n}" for n, t in before["training"].items() if after["training"][n] != t]
    return out


@pytest.fixture
def loaded_models(monkeypatch):
    """Every model `vitdiag.model.load` hands out during the test, with its state at loading."""
    seen: list[tuple[torch.nn.Module, dict]] = []
    real_load = vitdiag.model.load

    def load_and_keep(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        seen.append((loaded.model, _state(loaded.model)))
        return loaded

    monkeypatch.setattr(vitdiag.model, "load", load_and_keep)
    return seen


def _check_config(tmp_path) -> str:
    cfg = tmp_path / "vitdiag.toml"
    checks = [
        "eval.top1 >= 0",
        "similarity.last_block <= 1",
        "collapse.nc1 >= 0",
        "variance.shift@48 within [0.001, 1000]",
        "invariance.cutout.linv >= 0",
    ]
    lines = ",\n".join(f'  "{c}"' for c in checks)
    cfg.write_text(f'data = "{VAL}"\ntrain = "{TRAIN}"\nlimit = 8\nbatch_size = 4\n')
    cfg.write_text(cfg.read_text() + f"checks = [\n{lines},\n]\n")
    return str(cfg)


COMMANDS = {
    "info": lambda tmp: ["info", NOMIX],
    "eval": lambda tmp: ["eval", NOMIX, "--data", VAL, *SMALL],
    "variance": lambda tmp: ["variance", NOMIX, "--sizes", "48", "--data", VAL, *SMALL],
    "similarity": lambda tmp: ["similarity", NOMIX, "--data", TRAIN, "--random-baseline", *SMALL],
    "invariance": lambda tmp: [
        "invariance", NOMIX, "--data", TRAIN, "--aug", "cutout,mixup", "--views", "2", *SMALL
    ],
    "collapse": lambda tmp: [
        "collapse", NOMIX, "--data", TRAIN, "--val", VAL, "--mixup-geometry", "--train-mode",
        "--pairs", "2", *SMALL,
    ],
    "collapse-bn": lambda tmp: [
        "collapse", *RESNET, "--data", TRAIN, "--val", VAL, "--mixup-geometry", "--train-mode",
        "--pairs", "2", "--batch-size", "4", "--limit", "8", "--device", "cpu", "-q",
    ],
    "augment": lambda tmp: ["augment", "--ckpt", NOMIX, "--data", TRAIN, "--reprob", "0.5", *SMALL],
    "report": lambda tmp: [
        "report", NOMIX, "--data", TRAIN, "--val", VAL, "--sizes", "48", "--views", "2",
        "--pairs", "2", "--aug", "cutout,mixup", "--out", str(tmp / "rep"), *SMALL,
    ],
    "check": lambda tmp: ["check", NOMIX, "--config", _check_config(tmp), "--device", "cpu", "-q"],
    "fix-posembed": lambda tmp: [
        "fix-posembed", NOMIX, "--size", "48", "--out", str(tmp / "fixed"), "--data", VAL,
        *SMALL,
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_leaves_the_loaded_model_as_it_was(name, loaded_models, tmp_path):
    result = runner.invoke(app, COMMANDS[name](tmp_path))
    assert result.exit_code == 0, result.output
    assert loaded_models, "the command loaded no model through vitdiag.model.load"
    for model, before in loaded_models:
        assert _differences(model, before) == []


def _rng_states() -> tuple:
    return (
        random.getstate(),
        np.random.get_state()[1].copy(),
        torch.get_rng_state().clone(),
    )


def _same_rng(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_run_all_keeps_the_callers_modes_and_random_states():
    from vitdiag.model import load
    from vitdiag.runner import run_all

    loaded = load(NOMIX)
    model = loaded.model
    model.train()
    model.blocks[0].eval()  # a caller's mixed state: frozen first block
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    before, states = _state(model), _rng_states()
    run_all(
        loaded,
        TRAIN,
        val_source=VAL,
        sizes=[48],
        limit=8,
        batch_size=4,
        views=2,
        pairs=2,
        aug="cutout,mixup",
        train_mode=True,
        device="cpu",
    )
    assert _differences(model, before) == []
    assert _same_rng(_rng_states(), states)


def test_unchanged_restores_modes_and_rngs_whatever_the_body_does():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    model[1].eval()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    states = _rng_states()
    with pytest.raises(RuntimeError), unchanged(model):
        model.train()
        random.random(), np.random.rand(), torch.rand(3)
        raise RuntimeError("a probe failed half way")
    assert (model.training, model[0].training, model[1].training) == (True, True, False)
    assert _same_rng(_rng_states(), states)
