"""Resampling and rescaling position tables, and `vitdiag fix-posembed` end to end."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from typer.testing import CliRunner

from vitdiag.cli import app
from vitdiag.posembed import (
    grid_tokens,
    resample_table,
    rescale_grid,
    table_of,
    table_variance,
    target_table,
)
from vitdiag.size_sweep import build_at_size

runner = CliRunner()

# Tiny random-weight models, one per table layout / prefix arrangement.
TINY = {
    # class token + 2 registers: 3 prefix rows in the table
    "vit_reg": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=2),
    ),
    # DeiT-III: no_embed_class, the table has no prefix rows
    "deit3": (
        "deit3_small_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
    ),
    # PiT: channels-first (1, D, H, W), resampled by hand
    "pit": (
        "pit_ti_224",
        dict(img_size=32, patch_size=8, stride=4, base_dims=[8, 8], depth=[1, 1], heads=[1, 2]),
    ),
    # CaiT: the class token joins later, no prefix rows; timm does not resample it on load
    "cait": (
        "cait_xxs24_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, depth_token_only=1),
    ),
}


def save_tiny(out: Path, key: str, num_classes: int = 3) -> Path:
    """A random-weight model in timm's local-dir format, with a non-smooth position table."""
    import timm
    from safetensors.torch import save_file

    arch, args = TINY[key]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **args)
    with torch.no_grad():
        model.pos_embed.normal_()  # a visible table: timm initialises it at std 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    s = args["img_size"]
    config = {
        "architecture": arch,
        "num_classes": num_classes,
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [3, s, s],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "num_classes": num_classes,
        },
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("posembed_models")
    return {k: save_tiny(root / k, k) for k in TINY}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# resampling facts (SPEC §1)


def test_integer_nearest_upsampling_keeps_mean_and_variance_exactly():
    torch.manual_seed(1)
    table = torch.randn(1, 1 + 7 * 7, 24) * 0.3 + 0.1
    up = resample_table(
        table,
        layout="nlc",
        prefix_rows=1,
        old_grid=(7, 7),
        new_grid=(14, 14),
        interpolation="nearest",
    )
    a = grid_tokens(table, layout="nlc", prefix_rows=1).double()
    b = grid_tokens(up, layout="nlc", prefix_rows=1).double()
    # every value appears exactly 4 times: identical moments up to float64 summation order
    assert float(b.mean()) == pytest.approx(float(a.mean()), rel=1e-12, abs=1e-15)
    for key, value in table_variance(a).items():
        assert table_variance(b)[key] == pytest.approx(value, rel=1e-12)


def _weights(interp: str, new: int, old: int = 14) -> torch.Tensor:
    """The linear map of the resampling: resample an identity basis, one channel per input."""
    n = old * old
    eye = torch.eye(n, dtype=torch.float32)[None]
    out = resample_table(
        eye,
        layout="nlc",
        prefix_rows=0,
        old_grid=(old, old),
        new_grid=(new, new),
        interpolation=interp,
    )
    return out[0].double()  # (n_out, n_in): output token o = Σ_i W[o, i] x_i


@pytest.mark.parametrize(
    "interp, new, lo, hi",
    [
        ("nearest", 28, 0.995, 1.005),
        ("nearest", 21, 0.95, 1.05),
        ("bilinear", 28, 0.40, 0.44),  # SPEC: 0.42 at exact ×2
        ("bilinear", 21, 0.42, 0.52),
        ("bicubic", 28, 0.67, 0.70),  # SPEC: 0.68–0.69 with timm's antialias=True
        ("bicubic", 37, 0.67, 0.70),
    ],
)
def test_white_noise_variance_factor_matches_spec(interp, new, lo, hi):
    d = 512
    torch.manual_seed(0)
    noise = torch.randn(1, 14 * 14, d)
    out = resample_table(
        noise,
        layout="nlc",
        prefix_rows=0,
        old_grid=(14, 14),
        new_grid=(new, new),
        interpolation=interp,
    )
    measured = table_variance(grid_tokens(out, layout="nlc", prefix_rows=0))["global"]
    # The exact expectation and sampling error of the mean of y² for y = W x, x ~ N(0, I), per
    # channel: E = tr(WᵀW)/n_out, Var = 2 tr((WᵀW)²)/n_out²; channels are independent.
    w = _weights(interp, new)
    g = w.T @ w
    n_out = w.shape[0]
    expected = float(torch.trace(g)) / n_out
    se = math.sqrt(2 * float(torch.trace(g @ g))) / n_out / math.sqrt(d)
    assert abs(measured - expected) < 5 * se + 0.01, (measured, expected, se)
    assert lo - 5 * se <= measured <= hi + 5 * se, (measured, se)
    assert lo <= expected <= hi


# ---------------------------------------------------------------------------------------------
# tables of real timm models


def _timm(key: str, size: int | None = None):
    import timm

    arch, args = TINY[key]
    args = dict(args, img_size=size or args["img_size"])
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, num_classes=3, **args)
    with torch.no_grad():
        m.pos_embed.normal_()
    return m


def test_prefix_rows_kept_and_grid_is_timm_resample_times_c():
    src, dst = _timm("vit_reg"), _timm("vit_reg", 48)
    c = 0.77
    out = target_table(src, dst, c, "bicubic")
    ref = resample_abs_pos_embed(
        src.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=3
    )
    assert out.shape == dst.pos_embed.shape
    assert torch.equal(out[:, :3], src.pos_embed.detach()[:, :3])  # byte for byte
    assert torch.equal(out[:, 3:], ref[:, 3:] * c)


def test_deit3_table_has_no_prefix_rows():
    src, dst = _timm("deit3"), _timm("deit3", 64)
    assert src.pos_embed.shape[1] == 16  # 4x4 grid, nothing else
    out = target_table(src, dst, 0.5)
    ref = resample_abs_pos_embed(
        src.pos_embed.detach(), new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=0
    )
    assert torch.equal(out, ref * 0.5)


def test_pit_channels_first_table_resampled_as_tokens():
    src, dst = _timm("pit"), _timm("pit", 48)
    assert src.pos_embed.ndim == 4  # (1, D, H, W)
    out = target_table(src, dst, 1.3)
    assert out.shape == dst.pos_embed.shape
    d, h, w = src.pos_embed.shape[1:]
    tokens = src.pos_embed.detach().flatten(2).transpose(1, 2)
    nh, nw = dst.pos_embed.shape[-2:]
    ref = resample_abs_pos_embed(tokens, new_size=[nh, nw], old_size=[h, w], num_prefix_tokens=0)
    assert torch.equal(out, (ref * 1.3).transpose(1, 2).reshape(1, d, nh, nw))


def test_rescale_grid_leaves_prefix_rows_and_c_one_is_identity():
    t = torch.randn(1, 5, 4)
    assert torch.equal(rescale_grid(t, 1.0, layout="nlc", prefix_rows=1), t)
    s = rescale_grid(t, 2.0, layout="nlc", prefix_rows=1)
    assert torch.equal(s[:, :1], t[:, :1]) and torch.equal(s[:, 1:], t[:, 1:] * 2)


def test_build_at_size_never_touches_the_native_model(tiny_models):
    from vitdiag.model import load

    loaded = load(str(tiny_models["vit_reg"]))
    before = table_of(loaded.model).detach().clone()
    same = build_at_size(loaded, 32, c=0.5)
    assert same.model is not loaded.model
    assert torch.equal(table_of(loaded.model), before)
    assert torch.equal(table_of(same.model)[:, 3:], before[:, 3:] * 0.5)


# ---------------------------------------------------------------------------------------------
# fix-posembed end to end


def _fix(*args: str):
    return runner.invoke(app, ["fix-posembed", *args])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


_RELOAD = textwrap.dedent(
    """
    import sys, torch, timm
    x = torch.load(sys.argv[1])
    for out, y_path in zip(sys.argv[2::2], sys.argv[3::2]):
        model = timm.create_model("local-dir:" + out, pretrained=True).eval()
        with torch.inference_mode():
            torch.save(model(x), y_path)
    assert not any(m == "vitdiag" or m.startswith("vitdiag.") for m in sys.modules), "vitdiag!"
    """
)


@pytest.mark.slow
def test_written_checkpoint_loads_in_plain_timm_with_same_logits(tiny_models, tmp_path):
    from safetensors import safe_open

    from vitdiag.model import load

    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    expected, argv = {}, []
    for key in ("vit_reg", "pit"):  # prefix rows + nlc table; channels-first table by hand
        src = tiny_models[key]
        out = tmp_path / f"fixed_{key}"
        res = _fix(str(src), "--size", "48", "--out", str(out), "--rescale", "sqrt-area", "-q")
        assert res.exit_code == 0, res.output
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            meta = f.metadata()
            table = f.get_tensor("pos_embed")
        assert meta["source_sha256"] == _sha(src / "model.safetensors")
        assert float(meta["rescale_factor"]) == pytest.approx(32 / 48)
        assert meta["rescale_method"] == "sqrt-area"
        assert (meta["source_size"], meta["target_size"]) == ("32x32", "48x48")
        assert meta["vitdiag_version"]
        config = json.loads((out / "config.json").read_text())
        assert config["model_args"]["img_size"] == 48
        assert config["pretrained_cfg"]["input_size"] == [3, 48, 48]

        mem = build_at_size(load(str(src)), 48, c=32 / 48).model.eval()
        assert torch.equal(table, table_of(mem).detach())
        if key == "vit_reg":  # prefix rows byte for byte from the source file
            with safe_open(str(src / "model.safetensors"), "pt") as f:
                assert torch.equal(table[:, :3], f.get_tensor("pos_embed")[:, :3])
        with torch.inference_mode():
            expected[key] = mem(x)
        argv += [str(out), str(tmp_path / f"y_{key}.pt")]

    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(tmp_path / "x.pt"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for key, want in expected.items():
        got = torch.load(tmp_path / f"y_{key}.pt")
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), key


def test_cait_and_pth_format_reload_in_timm(tiny_models, tmp_path):
    import timm

    out = tmp_path / "cait48"
    res = _fix(
        str(tiny_models["cait"]), "--size", "48", "--out", str(out), "--rescale", "0.9",
        "--format", "pth", "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.pth"]
    sd = torch.load(out / "model.pth", weights_only=True)
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(model.pos_embed.detach(), sd["pos_embed"])
    assert model.pos_embed.shape[1] == 36
    assert json.loads((out / "config.json").read_text())["vitdiag"]["rescale_factor"] == "0.9"


def test_fix_posembed_never_overwrites_its_input(tiny_models, tmp_path):
    src = tiny_models["vit_reg"]
    before = _sha(src / "model.safetensors")
    for out, force in ((src, True), (src.parent, True), (src / "sub", True), (src, False)):
        args = [str(src), "--size", "48", "--out", str(out), "--rescale", "none"]
        err = _one_line_error(_fix(*args, *(["--force"] if force else [])))
        assert "input" in err
    # a single weights file as the input: its own folder contains it
    err = _one_line_error(
        _fix(
            str(src / "model.safetensors"),
            "--size",
            "48",
            "--out",
            str(src),
            "--force",
            "--rescale",
            "none",
        )  # fmt: skip
    )
    assert "input" in err
    assert _sha(src / "model.safetensors") == before
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]


def test_fix_posembed_refuses_existing_out_without_force(tiny_models, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [str(tiny_models["deit3"]), "--size", "48", "--out", str(out), "--rescale", "none"]
    err = _one_line_error(_fix(*args))
    assert "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    res = _fix(*args, "--force", "-q")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_fix_posembed_errors_are_one_line(tiny_models, tmp_path):
    src = str(tiny_models["vit_reg"])
    err = _one_line_error(_fix(src, "--size", "48", "--out", str(tmp_path / "a")))
    assert "--data" in err  # empirical needs images
    err = _one_line_error(
        _fix(src, "--size", "50", "--out", str(tmp_path / "b"), "--rescale", "none")
    )
    assert "48" in err and "56" in err  # the nearest valid sizes
    err = _one_line_error(
        _fix(src, "--size", "48", "--out", str(tmp_path / "c"), "--rescale", "-1")
    )
    assert "positive" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fix_posembed_with_data_reports_r_and_accuracy(tiny_models, image_folder, tmp_path):
    out = tmp_path / "emp"
    res = runner.invoke(
        app,
        [
            "fix-posembed", str(tiny_models["vit_reg"]), "--size", "48", "--out", str(out),
            "--data", str(image_folder), "--json", str(tmp_path / "r.json"), "-q",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())["results"][0]
    for table in result["tables"]:
        assert all(len(row) == len(table["columns"]) for row in table["rows"]), table["title"]
    m = result["metrics"]
    # the empirical factor restores r0 exactly, by construction
    assert m["r_after"] == pytest.approx(m["r0"], rel=1e-9)
    assert m["r_before"] / m["c"] ** 2 == pytest.approx(m["r_after"], rel=1e-12)
    assert {"top1_before", "top1_after", "nll_before", "nll_after"} <= set(m)
    assert m["reload_max_abs_diff"] <= 1e-5
