"""Reliability v2 for loading: the weights that are evaluated are the weights in the file.

A catalogue of bad checkpoints (parts missing, configs that contradict the weights or are
malformed or hostile): each must raise one-sentence `VitdiagError` from `vitdiag.load` and
make `vitdiag info` exit 2 with the same sentence. Choices the files leave open (two weight
files, EMA beside plain weights, half-precision storage) load with a one-line note.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file
from tolerances import FORWARD_RTOL
from typer.testing import CliRunner

import vitdiag
from vitdiag.cli import app
from vitdiag.errors import VitdiagError
from vitdiag.model import describe

FX = FIXTURES / "models" / "vit_nomix"  # vit_tiny at 32 px: dim 64, depth 4, 10 classes
runner = CliRunner()


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return load_file(FX / "model.safetensors")


@pytest.fixture(scope="module")
def cfg() -> dict:
    return json.loads((FX / "config.json").read_text())


def _folder(root: Path, sd: dict | None, cfg: dict | bytes | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if sd is not None:
        save_file({k: v.contiguous() for k, v in sd.items()}, root / "model.safetensors")
    if isinstance(cfg, bytes):
        (root / "config.json").write_bytes(cfg)
    elif cfg is not None:
        (root / "config.json").write_text(json.dumps(cfg))
    return root


def _with(cfg: dict, **changes) -> dict:
    """A deep copy of the config with dotted keys changed ('model_args.depth': 6); None drops."""
    out = json.loads(json.dumps(cfg))
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        d = out
        for p in path:
            d = d[p]
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    return out


def _drop(sd: dict, prefix: str) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}


@dataclass
class Case:
    id: str
    make: Callable[[Path, dict, dict], Path]  # (tmp, state dict, config) -> path to load
    needles: tuple[str, ...]  # what the one line must name


CASES = [
    # weights missing a part the architecture has
    Case("no-block", lambda t, s, c: _folder(t, _drop(s, "blocks.3."), c), ("blocks.3.",)),
    Case("no-head", lambda t, s, c: _folder(t, _drop(s, "head."), c), ("head.weight",)),
    Case(
        "renamed-head",
        lambda t, s, c: _folder(t, {k.replace("head.", "fc."): v for k, v in s.items()}, c),
        ("head.weight",),
    ),
    Case(
        "no-head-pth",
        lambda t, s, c: _pth(t, _drop(s, "head."), c),
        ("head.weight", "missing"),
    ),
    # config.json naming another architecture than the weights
    Case(
        "config-wider",
        lambda t, s, c: _folder(t, s, _with(c, **{"model_args.embed_dim": 96})),
        ("vit_tiny_patch16_224", "64", "96"),
    ),
    Case(
        "config-deeper",
        lambda t, s, c: _folder(t, s, _with(c, **{"model_args.depth": 6})),
        ("blocks.4.", "missing"),
    ),
    Case(
        "config-shallower",
        lambda t, s, c: _folder(t, s, _with(c, **{"model_args.depth": 2})),
        ("blocks.2.", "lacks"),
    ),
    Case(
        "config-vit-small",
        lambda t, s, c: _folder(
            t, s, _with(c, architecture="vit_small_patch16_224", model_args={})
        ),
        ("vit_small_patch16_224", "384", "64"),
    ),
    Case(
        "config-classes",
        lambda t, s, c: _folder(t, s, _with(c, **{"model_args.num_classes": 5})),
        ("head.weight", "(10, 64)", "(5, 64)"),
    ),
    # malformed or hostile config.json
    Case("not-json", lambda t, s, c: _folder(t, s, b"{not json"), ("config.json", "json")),
    Case("json-list", lambda t, s, c: _folder(t, s, b"[1, 2]"), ("config.json", "object")),
    Case("not-utf8", lambda t, s, c: _folder(t, s, b'\xff\xfe{"a": 1}'), ("config.json", "utf-8")),
    Case(
        "deep-nesting",
        lambda t, s, c: _folder(t, s, b"[" * 100_000 + b"]" * 100_000),
        ("config.json", "nested"),
    ),
    Case(
        "nan",
        lambda t, s, c: _folder(t, s, json.dumps(_with(c, num_classes=float("nan"))).encode()),
        ("config.json", "nan"),
    ),
    Case(
        "duplicate-key",
        lambda t, s, c: _folder(
            t,
            s,
            b'{"architecture": "vit_tiny_patch16_224", "architecture": "vit_small_patch16_224"}',
        ),
        ("config.json", "architecture", "twice"),
    ),
    Case(
        "huge-file",
        lambda t, s, c: _folder(t, s, b'{"pad": "' + b" " * (17 << 20) + b'"}'),
        ("config.json", "mib"),
    ),
    Case(
        "num-classes-word",
        lambda t, s, c: _folder(t, s, _with(c, **{"model_args.num_classes": "ten"})),
        ("num_classes", "'ten'"),
    ),
    Case(
        "depth-string",
        lambda t, s, c: _folder(t, s, _with(c, **{"model_args.depth": "4"})),
        ("depth", "'4'"),
    ),
    Case(
        "architecture-int",
        lambda t, s, c: _folder(t, s, _with(c, architecture=5)),
        ("'architecture'", "5"),
    ),
    Case(
        "img-size-short-list",
        lambda t, s, c: _folder(t, s, _with(c, **{"model_args.img_size": [224]})),
        ("224x224", "32x32"),
    ),
    Case(
        "img-size-negative",
        lambda t, s, c: _folder(t, s, _with(c, **{"model_args.img_size": -1})),
        ("img_size", "positive"),
    ),
    Case(
        "img-size-1e9",
        lambda t, s, c: _folder(t, s, _with(c, **{"model_args.img_size": 10**9})),
        ("1000000000x1000000000", "32x32"),
    ),
    Case(
        "mean-string",
        lambda t, s, c: _folder(t, s, _with(c, **{"pretrained_cfg.mean": "abc"})),
        ("pretrained_cfg.mean",),
    ),
    Case(
        "std-zero",
        lambda t, s, c: _folder(t, s, _with(c, **{"pretrained_cfg.std": [0, 0.2, 0.2]})),
        ("pretrained_cfg.std", "non-zero"),
    ),
    Case(
        "label-names-short",
        lambda t, s, c: _folder(t, s, _with(c, label_names=["a", "b"])),
        ("label names", "2", "10"),
    ),
    Case(
        "transformers-no-classifier",
        lambda t, s, c: _transformers(t, "classifier."),
        ("ViTForImageClassification", "classifier"),
    ),
    Case(
        "transformers-no-layer",
        lambda t, s, c: _transformers(t, ".layer.1."),
        ("missing blocks.1.",),
    ),
    Case(
        "two-pth-no-preferred",
        lambda t, s, c: _two_pth(t, s),
        ("a.pth", "b.pth"),
    ),
]


def _transformers(tmp: Path, drop: str) -> Path:
    """A tiny transformers ViTForImageClassification folder with the tensors under `drop` gone."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp)
    sd = load_file(tmp / "model.safetensors")
    save_file({k: v for k, v in sd.items() if drop not in k}, tmp / "model.safetensors")
    return tmp


def _pth(tmp: Path, sd: dict, cfg: dict) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, tmp / "weights.pth")
    return tmp / "weights.pth"


def _two_pth(tmp: Path, sd: dict) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(sd, tmp / "a.pth")
    torch.save(sd, tmp / "b.pth")
    return tmp


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_refused_with_one_line_in_api_and_cli(case, tmp_path, sd, cfg):
    path = case.make(tmp_path / "ck", sd, cfg)
    with pytest.raises(VitdiagError) as info:
        vitdiag.load(str(path))
    msg = str(info.value)
    assert "\n" not in msg
    for needle in case.needles:
        assert needle.lower() in msg.lower(), (needle, msg)

    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip() == f"error: {msg}"


# --------------------------------------------------------------------------- open choices


def _note_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("note: ")]


def test_two_weight_files_use_safetensors_and_say_so(tmp_path, sd, cfg, capsys):
    folder = _folder(tmp_path / "ck", sd, cfg)
    # a different model under the other name, so using it would show in the weights
    torch.save({k: v + 1 for k, v in sd.items()}, folder / "pytorch_model.bin")
    loaded = vitdiag.load(str(folder))
    assert Path(loaded.provenance["weights_file"]).name == "model.safetensors"
    assert torch.equal(loaded.model.head.weight, sd["head.weight"])
    (note,) = loaded.provenance["notes"]
    assert "model.safetensors" in note and "pytorch_model.bin" in note
    assert note in loaded.provenance["decided_by"]
    assert _note_lines(capsys.readouterr().err) == [f"note: {note}."]
    # the documented way to choose the other one: point at it
    other = vitdiag.load(str(folder / "pytorch_model.bin"))
    assert torch.equal(other.model.head.weight, sd["head.weight"] + 1)
    assert "notes" not in other.provenance


@pytest.mark.parametrize(
    "keys", [("state_dict", "state_dict_ema"), ("model", "model_ema"), ("model", "ema")]
)
def test_ema_beside_plain_weights_is_stated_and_selectable(tmp_path, sd, cfg, keys, capsys):
    main_key, ema_key = keys
    ema_sd = {k: v * 0.5 for k, v in sd.items()}
    path = _pth(tmp_path / "ck", {}, cfg)
    torch.save({main_key: sd, ema_key: ema_sd, "epoch": 3}, path)
    plain = vitdiag.load(str(path))
    assert torch.equal(plain.model.head.weight, sd["head.weight"])
    assert plain.provenance["ema"] is False
    assert main_key in plain.provenance["ema_note"] and ema_key in plain.provenance["ema_note"]
    assert "--ema" in plain.provenance["ema_note"]
    assert _note_lines(capsys.readouterr().err) == [f"note: {plain.provenance['ema_note']}."]
    ema = vitdiag.load(str(path), ema=True)
    assert torch.equal(ema.model.head.weight, ema_sd["head.weight"])
    assert ema.provenance["ema"] is True and ema_key in ema.provenance["ema_note"]


def test_plain_checkpoint_has_no_notes(capsys):
    loaded = vitdiag.load(str(FX))
    assert "notes" not in loaded.provenance and "stored_dtype" not in loaded.provenance
    assert "notes" not in describe(loaded)
    assert _note_lines(capsys.readouterr().err) == []


# --------------------------------------------------------------------------- half precision


def _val_batch(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    """The 200 fixture val images through the model's own data config, with their labels."""
    import timm.data
    from PIL import Image

    t = timm.data.create_transform(**loaded.data_config, is_training=False)
    root = FIXTURES / "data" / "val"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).glob("*.jpg")):
            xs.append(t(Image.open(f).convert("RGB")))
            ys.append(i)
    return torch.stack(xs), torch.tensor(ys)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_checkpoint_computes_in_float32(tmp_path, sd, cfg, dtype, capsys):
    half = {k: v.to(dtype) for k, v in sd.items()}
    loaded = vitdiag.load(str(_folder(tmp_path / "half", half, cfg)))
    name = str(dtype).removeprefix("torch.")
    assert loaded.provenance["stored_dtype"] == name
    assert describe(loaded)["stored_dtype"] == name
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert f"stored as {name}" in capsys.readouterr().err

    # the exact promise: the same as float32 weights equal to the rounded ones
    rounded = vitdiag.load(
        str(_folder(tmp_path / "rounded", {k: v.float() for k, v in half.items()}, cfg))
    )
    full = vitdiag.load(str(FX))
    x, y = _val_batch(full)
    with torch.no_grad():
        z_half, z_round, z_full = (m.model(x) for m in (loaded, rounded, full))
    scale = z_round.abs().max()
    assert (z_half - z_round).abs().max() <= FORWARD_RTOL * scale

    # against the original float32 weights, only the rounding of the weights separates them.
    # Measured on the fixture's 200 val images (logit scale 7.13): fp16 moves the logits by
    # 6.6e-4 of the scale (1.36 eps16, eps16 = 2^-11), bf16 by 5.4e-3 (1.38 eps_bf16 = 2^-8
    # relative per weight); NLL moves by 0.07 eps. The budget is 8 eps: a 6x margin, and
    # 8 eps x 7.13 = 0.22 for bf16 is below the smallest top-1 margin (1.20), so top-1 is exact.
    eps = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    assert (z_half - z_full).abs().max() <= 8 * eps * scale
    assert torch.equal(z_half.argmax(1), z_full.argmax(1))
    nll = [torch.nn.functional.cross_entropy(z.double(), y).item() for z in (z_half, z_full)]
    assert abs(nll[0] - nll[1]) <= 8 * eps * max(1.0, nll[1])


def test_headless_weights_with_arch_are_stated(tmp_path, sd, capsys):
    """--arch with a file that has no head: a backbone, said so, never a random head."""
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in _drop(sd, "head.").items()}, path)
    args = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}
    loaded = vitdiag.load(str(path), arch="vit_tiny_patch16_224", model_args=args)
    assert loaded.num_classes == 0 and isinstance(loaded.model.head, torch.nn.Identity)
    assert "no classifier head" in loaded.provenance["notes"][0]
    assert "no classifier head" in capsys.readouterr().err
    with pytest.raises(VitdiagError, match="head.weight"):
        vitdiag.load(str(path), arch="vit_tiny_patch16_224", model_args={**args, "num_classes": 10})
