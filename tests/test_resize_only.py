"""`vitdiag fix-posembed --resize-only`: a checkpoint at a new size with nothing rescaled, also for
families with no absolute position table (Swin, BEiT: relative tables; XCiT: Fourier)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from vitdiag.cli import app
from vitdiag.model import at_size, load

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
VIT = ROOT / "fixtures" / "models" / "vit_nomix"  # 32x32, patch 4

# Tiny random-weight models: (arch, model_args, native size, new size).
TINY = {
    # window 7 at 64: stage grids 16, 8, 4, 2 -> windows 7, 7, 4, 2; at 96: 24, 12, 6, 3 ->
    # 7, 7, 6, 3, so the last two stages' tables change size; stage 1 has a shifted block.
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, depths=[2, 1, 1, 1], embed_dim=16, num_heads=[1, 1, 2, 2]),
        64,
        96,
    ),
    # BEiT's window is the whole grid: 4x4 at 32 (7²+3 rows), 6x6 at 48 (11²+3 rows)
    "beit": (
        "beit_base_patch16_224",
        dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
        32,
        48,
    ),
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=32, depth=2), 32, 48),
}


def save_tiny(out: Path, key: str, num_classes: int = 3) -> Path:
    """A random-weight model in timm's local-dir format, relative tables made visible."""
    import timm
    from safetensors.torch import save_file

    arch, args, size, _ = TINY[key]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()  # timm initialises them at std 0.02 (BEiT at 0): too quiet to see
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    config = {
        "architecture": arch,
        "num_classes": num_classes,
        "model_args": args,
        "pretrained_cfg": {"input_size": [3, size, size], "num_classes": num_classes},
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resize_only_models")
    return {k: save_tiny(root / k, k) for k in TINY}


def _fix(*args: str):
    return runner.invoke(app, ["fix-posembed", *args])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def _rel_tables(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items() if k.endswith("relative_position_bias_table")}


# Plain timm in a fresh interpreter: build each OUT at its size, save logits and table shapes.
_RELOAD = textwrap.dedent(
    """
    import json, sys, torch, timm
    shapes = {}
    for out, x_path, y_path in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
        model = timm.create_model("local-dir:" + out, pretrained=True).eval()
        with torch.inference_mode():
            torch.save(model(torch.load(x_path)), y_path)
        shapes[out] = {k: list(v.shape) for k, v in model.state_dict().items()
                       if k.endswith("relative_position_bias_table")}
    assert not any(m == "vitdiag" or m.startswith("vitdiag.") for m in sys.modules), "vitdiag!"
    json.dump(shapes, open(sys.argv[1], "w"))
    """
)


@pytest.mark.slow
def test_relative_and_fourier_families_resize_and_reload_in_plain_timm(tiny, tmp_path):
    expected, argv, outs = {}, [], {}
    for key, (_, _, native, new) in TINY.items():
        src = tiny[key]
        out = tmp_path / f"{key}_{new}"
        res = _fix(str(src), "--size", str(new), "--out", str(out), "--resize-only", "-q")
        assert res.exit_code == 0, (key, res.output)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        config = json.loads((out / "config.json").read_text())
        assert config["model_args"]["img_size"] == new
        assert config["pretrained_cfg"]["input_size"] == [3, new, new]
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["resize_only"] == "True" and float(meta["rescale_factor"]) == 1.0
        assert (meta["source_size"], meta["target_size"]) == (f"{native}x{native}", f"{new}x{new}")

        # vitdiag's in-memory model at the new size, from the source file
        mem = at_size(load(str(src)), new)
        written = _tensors(out)
        for k, v in mem.model.state_dict().items():
            if k in written:
                assert torch.equal(written[k], v), (key, k)
        x = torch.randn(2, 3, new, new, generator=torch.Generator().manual_seed(1))
        torch.save(x, tmp_path / f"x_{key}.pt")
        with torch.inference_mode():
            expected[key] = mem.model.eval()(x)
        outs[key] = (src, out)
        argv += [str(out), str(tmp_path / f"x_{key}.pt"), str(tmp_path / f"y_{key}.pt")]

    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(tmp_path / "shapes.json"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    shapes = json.loads((tmp_path / "shapes.json").read_text())
    for key, want in expected.items():
        got = torch.load(tmp_path / f"y_{key}.pt")
        assert torch.isfinite(got).all(), key
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (key, (got - want).abs().max())

    # the relative tables as timm builds them at the new size, and as written
    src_swin = _rel_tables(_tensors(outs["swin"][0]))
    new_swin = {k: tuple(v) for k, v in shapes[str(outs["swin"][1])].items()}
    assert _rel_tables(_tensors(outs["swin"][1])) == new_swin
    assert new_swin["layers.2.blocks.0.attn.relative_position_bias_table"] == (11 * 11, 2)
    assert new_swin["layers.3.blocks.0.attn.relative_position_bias_table"] == (5 * 5, 2)
    assert src_swin["layers.2.blocks.0.attn.relative_position_bias_table"] == (7 * 7, 2)
    assert src_swin["layers.0.blocks.1.attn.relative_position_bias_table"] == (13 * 13, 1)
    assert new_swin["layers.0.blocks.1.attn.relative_position_bias_table"] == (13 * 13, 1)
    new_beit = {k: tuple(v) for k, v in shapes[str(outs["beit"][1])].items()}
    assert new_beit == {f"blocks.{i}.attn.relative_position_bias_table": (11 * 11 + 3, 2)
                        for i in range(2)}  # fmt: skip
    assert _rel_tables(_tensors(outs["beit"][0]))["blocks.0.attn.relative_position_bias_table"] == (
        7 * 7 + 3,
        2,
    )
    # a table whose window did not change is carried over byte for byte
    k = "layers.0.blocks.1.attn.relative_position_bias_table"
    assert torch.equal(_tensors(outs["swin"][1])[k], _tensors(outs["swin"][0])[k])


def test_swin_resized_table_is_timms_resize_rel_pos_bias_table(tiny, tmp_path):
    from timm.layers import resize_rel_pos_bias_table

    out = tmp_path / "swin96"
    res = _fix(str(tiny["swin"]), "--size", "96", "--out", str(out), "--resize-only", "-q")
    assert res.exit_code == 0, res.output
    k = "layers.2.blocks.0.attn.relative_position_bias_table"
    src = _tensors(tiny["swin"])[k]
    want = resize_rel_pos_bias_table(src, new_window_size=(6, 6), new_bias_shape=(121, 2))
    assert torch.allclose(_tensors(out)[k], want, atol=1e-6)


def test_vit_resize_only_equals_rescale_none(tmp_path):
    a, b = tmp_path / "ro", tmp_path / "none"
    res = _fix(str(VIT), "--size", "48", "--out", str(a), "--resize-only", "-q")
    assert res.exit_code == 0, res.output
    res = _fix(str(VIT), "--size", "48", "--out", str(b), "--rescale", "none", "-q")
    assert res.exit_code == 0, res.output
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert ta["pos_embed"].shape == (1, 1 + 12 * 12, 64)
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca["model_args"] == cb["model_args"] and ca["pretrained_cfg"] == cb["pretrained_cfg"]
    # --rescale none together with --resize-only says the same thing twice: allowed
    res = _fix(str(VIT), "--size", "48", "--out", str(tmp_path / "both"), "--resize-only",
               "--rescale", "none", "-q")  # fmt: skip
    assert res.exit_code == 0, res.output


def test_without_resize_only_relative_families_point_to_it(tiny, tmp_path):
    for key in ("swin", "beit", "xcit"):
        out = tmp_path / key
        err = _one_line_error(_fix(str(tiny[key]), "--size", "96", "--out", str(out),
                                   "--rescale", "none"))  # fmt: skip
        assert "--resize-only" in err, err
        assert "relative" in err or "Fourier" in err, err  # the reason is kept
        assert not out.exists()


def test_bad_combinations_and_sizes_are_one_line_errors(tiny, tmp_path):
    out = tmp_path / "o"
    for rescale in ("sqrt-area", "empirical", "0.5"):
        err = _one_line_error(
            _fix(str(VIT), "--size", "48", "--out", str(out), "--resize-only", "--rescale", rescale)
        )
        assert "--resize-only" in err and "--rescale" in err, err
    # Swin's grid halves three times: sizes must be multiples of 4 * 2**3 = 32
    err = _one_line_error(
        _fix(str(tiny["swin"]), "--size", "80", "--out", str(out), "--resize-only")
    )
    assert "64" in err and "96" in err, err
    err = _one_line_error(
        _fix(str(tiny["beit"]), "--size", "44", "--out", str(out), "--resize-only")
    )
    assert "40" in err and "48" in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_resize_only_reports_the_resized_tables(tiny, tmp_path):
    res = runner.invoke(
        app,
        [
            "fix-posembed", str(tiny["beit"]), "--size", "48", "--out", str(tmp_path / "b"),
            "--resize-only", "--json", str(tmp_path / "r.json"), "-q",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())["results"][0]
    m = result["metrics"]
    assert m["c"] == 1.0 and m["resized_tensors"] == 2
    assert m["reload_max_abs_diff"] <= 1e-5
    rows = result["tables"][0]["rows"]
    assert ["blocks.0.attn.relative_position_bias_table", "(52, 2)", "(124, 2)"] in rows
