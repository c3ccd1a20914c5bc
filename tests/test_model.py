"""vitdiag.model: checkpoint formats, architecture resolution, building at a size, bad input.

Models carry random weights and are built at small image sizes; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from vitdiag.errors import VitdiagError
from vitdiag.loading.timm_internals import SkipParamInit
from vitdiag.model import at_size, describe, load, sha256_file, valid_sizes_near

ROOT = Path(__file__).resolve().parents[1]

REG_ARGS = dict(reg_tokens=4, class_token=False, global_pool="avg", no_embed_class=True)

# name: (arch, img size, model args of the saved model, registered shapes?)
# The big ones are cut down with model_args for the format round trips; the bare-state-dict
# test below builds the registered shapes.
CASES = {
    "vit": ("vit_tiny_patch16_224", 64, {}),
    "deit": ("deit_tiny_patch16_224", 64, {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", 64, {}),
    "deit3": ("deit3_small_patch16_224", 64, {"depth": 2}),
    "vit_reg_gap": ("vit_tiny_patch16_224", 64, REG_ARGS),
    "vit_reg_registered": ("vit_wee_patch16_reg1_gap_256", 64, {"depth": 2}),
    "eva02": ("eva02_tiny_patch14_224", 56, {}),
    "flexivit": ("flexivit_small", 64, {"depth": 2}),
    "cait": ("cait_xxs24_224", 64, {"depth": 2, "depth_token_only": 1}),
    "pit": ("pit_ti_224", 64, {}),
    "beit": ("beit_base_patch16_224", 64, {"depth": 1, "embed_dim": 192, "num_heads": 3}),
    "swin": ("swin_tiny_patch4_window7_224", 64, {"depths": (1, 1, 1, 1), "embed_dim": 48}),
    "xcit": ("xcit_nano_12_p16_224", 64, {"depth": 2}),
    "resnet": ("resnet18", 64, {"layers": (1, 1, 1, 1)}),
}
FORMATS = ["safetensors", "pt", "pth_model", "pth_ema", "bin_module", "dir"]
SLOW_CASES = {"beit", "swin", "resnet", "deit3", "flexivit"}  # the largest files


def _fixed(arch: str) -> bool:
    return bool(timm.models.get_pretrained_cfg(arch).fixed_input_size)


def random_model(arch: str, size: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm model with seeded random weights, without timm's slow truncated-normal init."""
    if _fixed(arch):
        kwargs.setdefault("img_size", size)
    with SkipParamInit():
        model = timm.create_model(arch, pretrained=False, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)  # norm scales near 1 keep activations alive
            else:
                p.copy_(0.05 * noise)
    return model.eval()


def plain_sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_formats(model: torch.nn.Module, arch: str, size: int, args: dict, out: Path) -> dict:
    sd = plain_sd(model)
    paths = {}
    out.mkdir(parents=True, exist_ok=True)
    paths["safetensors"] = out / "w.safetensors"
    save_file(sd, paths["safetensors"])
    paths["pt"] = out / "w.pt"
    torch.save(sd, paths["pt"])
    paths["pth_model"] = out / "w_model.pth"
    torch.save({"model": sd, "epoch": 3}, paths["pth_model"])
    # The plain weights are perturbed so that picking them instead of the EMA shows.
    noisy = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in sd.items()}
    paths["pth_ema"] = out / "w_ema.pth"
    torch.save({"state_dict": noisy, "state_dict_ema": sd, "epoch": 3}, paths["pth_ema"])
    paths["bin_module"] = out / "w.bin"
    torch.save({f"module.{k}": v for k, v in sd.items()}, paths["bin_module"])
    d = out / "dir"
    d.mkdir()
    save_file(sd, d / "model.safetensors")
    model_args = dict(args)
    if _fixed(arch):
        model_args["img_size"] = size
    cfg = {
        "architecture": arch,
        "num_classes": model.num_classes,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "mean": [0.4, 0.4, 0.4],
            "std": [0.2, 0.2, 0.2],
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "num_classes": model.num_classes,
        },
    }
    (d / "config.json").write_text(json.dumps(cfg))
    paths["dir"] = d
    return paths


@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n for n in CASES],
)
def saved(request, tmp_path_factory):
    name = request.param
    arch, size, args = CASES[name]
    model = random_model(arch, size, **args)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    paths = write_formats(model, arch, size, args, tmp_path_factory.mktemp(name))
    return {"name": name, "arch": arch, "size": size, "args": args, "x": x, "ref": ref, **paths}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reloads_to_identical_outputs(saved, fmt):
    arch, args = saved["arch"], saved["args"]
    kwargs = {} if fmt == "dir" else {"arch": arch, "model_args": dict(args) or None}
    if fmt == "pth_ema":
        kwargs["ema"] = True
    if not _fixed(arch) or arch.startswith("xcit"):
        kwargs["img_size"] = saved["size"]  # nothing in these weights records the size
    loaded = load(saved[fmt], **kwargs)
    with torch.no_grad():
        out = loaded.model(saved["x"])
    assert torch.equal(out, saved["ref"])
    desc = describe(loaded)
    assert desc["arch"] == arch
    assert desc["family"] == loaded.family.name
    assert desc["ema"] is (fmt == "pth_ema")
    assert loaded.img_size == (saved["size"], saved["size"])
    assert not loaded.model.training
    json.dumps(desc)  # JSON-able as it is
    weights = saved[fmt] / "model.safetensors" if fmt == "dir" else saved[fmt]
    assert desc["sha256"] == sha256_file(weights)
    names = {a.name for a in loaded.assumptions}
    assert {"mean/std", "native size", "interpolation/crop_pct"} <= names
    if fmt == "dir":
        assert "config.json" in desc["decided_by"]
        assert loaded.data_config["mean"] == (0.4, 0.4, 0.4)
        assert loaded.data_config["interpolation"] == "bilinear"
        mean = next(a for a in loaded.assumptions if a.name == "mean/std")
        assert "config.json" in mean.source and mean.override == "--mean/--std"


def test_bare_state_dict_names_the_arch_or_says_it_is_ambiguous(saved):
    # Without --arch or a config: matching. The cut-down models say what was cut down
    # (--model-arg depth=2), the rest are timm's registered shapes.
    arch, args, size = saved["arch"], saved["args"], saved["size"]
    path = saved["safetensors"]
    try:
        loaded = load(path, model_args=dict(args) or None, img_size=None if _fixed(arch) else size)
    except VitdiagError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg
        assert "several" in msg and arch in msg and "--arch" in msg
        return
    fitting = " ".join(a.source for a in loaded.assumptions if a.name == "architecture")
    assert loaded.arch == arch or arch in fitting
    assert "matched the tensor shapes" in loaded.provenance["decided_by"]
    with torch.no_grad():
        assert torch.equal(loaded.model(saved["x"]), saved["ref"])
    if loaded.arch != arch:  # an equivalent architecture was picked: say so, with the override
        a = next(a for a in loaded.assumptions if a.name == "architecture")
        assert a.override == "--arch"


def test_same_shape_architectures_pick_the_canonical_one_and_say_so(tmp_path):
    model = random_model("deit_tiny_patch16_224", 64)
    path = tmp_path / "deit.safetensors"
    save_file(plain_sd(model), path)
    loaded = load(path)
    # vit_tiny and deit_tiny differ only in their data config: the weights cannot tell.
    assert loaded.arch == "vit_tiny_patch16_224"
    arch = next(a for a in loaded.assumptions if a.name == "architecture")
    assert "deit_tiny_patch16_224" in arch.source and arch.override == "--arch"
    heads = next(a for a in loaded.assumptions if a.name == "num_heads")
    assert heads.value == "3" and "num_heads" in heads.override
    mean = next(a for a in loaded.assumptions if a.name == "mean/std")
    assert "timm default" in mean.source
    assert describe(loaded)["native_size"] == [64, 64]


def test_unregistered_vit_is_inferred_from_shapes_with_assumed_heads(tmp_path):
    args = dict(patch_size=4, embed_dim=64, depth=2, num_heads=1, num_classes=5, mlp_ratio=2.0)
    model = random_model("vit_tiny_patch16_224", 32, **args)
    path = tmp_path / "custom.pth"
    torch.save({"model": plain_sd(model)}, path)
    loaded = load(path)
    assert loaded.build_kwargs["embed_dim"] == 64 and loaded.build_kwargs["depth"] == 2
    assert loaded.build_kwargs["mlp_ratio"] == 2.0 and loaded.native_size == (32, 32)
    assert "inferred a VisionTransformer" in loaded.provenance["decided_by"]
    heads = next(a for a in loaded.assumptions if a.name == "num_heads")
    assert heads.value == "1" and "embed_dim // 64" in heads.source
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    # The override reaches the build.
    assert load(path, model_args={"num_heads": 2}).build_kwargs["num_heads"] == 2


def test_training_args_in_the_checkpoint_decide_the_arch(tmp_path):
    model = random_model("deit_tiny_patch16_224", 64)
    path = tmp_path / "checkpoint-3.pth.tar"
    args = argparse.Namespace(model="deit_tiny_patch16_224", input_size=64, mean=None)
    torch.save({"model": plain_sd(model), "args": args, "epoch": 3}, path)
    loaded = load(path)
    assert loaded.arch == "deit_tiny_patch16_224"  # not the canonical vit_tiny twin
    assert "training args" in loaded.provenance["decided_by"]
    assert loaded.native_size == (64, 64)


def test_only_ema_weights_are_used_and_reported(tmp_path):
    model = random_model("vit_tiny_patch16_224", 64)
    path = tmp_path / "ema_only.pth"
    torch.save({"model_ema": {f"_orig_mod.{k}": v for k, v in plain_sd(model).items()}}, path)
    loaded = load(path, arch="vit_tiny_patch16_224")
    assert loaded.provenance["ema"] is True
    assert "only EMA" in loaded.provenance["decided_by"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_file_beside_a_config_json_uses_it(tmp_path):
    args = {"img_size": 48, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    model = random_model("vit_tiny_patch16_224", 48, **args)
    save_file(plain_sd(model), tmp_path / "weights.safetensors")
    cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 1000, "model_args": args}
    cfg["pretrained_cfg"] = {"label_names": ["a"] * 1000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load(tmp_path / "weights.safetensors")
    assert loaded.arch == "vit_tiny_patch16_224" and loaded.native_size == (48, 48)
    assert loaded.provenance["label_names"][0] == "a"
    assert "config.json" in loaded.provenance["decided_by"]


def test_unsafe_pickle_loads_a_whole_module_with_a_warning(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(VitdiagError, match="--unsafe-pickle"):
        load(path)
    with pytest.warns(UserWarning, match="unsafe-pickle"):
        loaded = load(path, unsafe_pickle=True)
    assert loaded.arch == "vit_tiny_patch16_224" and loaded.num_classes == 3
    assert loaded.native_size == (32, 32)


def test_arch_alone_builds_seeded_random_weights():
    a = load(None, arch="vit_tiny_patch16_224", img_size=32, model_args={"depth": 1})
    b = load(None, arch="vit_tiny_patch16_224", img_size=32, model_args={"depth": 1})
    assert a.state_dict is None and a.provenance["format"] == "random"
    assert a.img_size == (32, 32) and a.native_size == (224, 224)
    assert torch.equal(a.model.pos_embed, b.model.pos_embed)
    c = at_size(a, 48)
    assert torch.equal(c.model.pos_embed[:, :1], a.model.pos_embed[:, :1])
    assert describe(a)["sha256"] is None


# --------------------------------------------------------------------------- sizes


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    model = random_model("vit_tiny_patch16_224", 64, num_classes=7)
    path = tmp_path_factory.mktemp("vit") / "vit7.safetensors"
    save_file(plain_sd(model), path)
    return path, model


def test_seven_class_checkpoint_keeps_its_trained_head(vit_file):
    path, model = vit_file
    for loaded in (load(path), load(path, arch="vit_tiny_patch16_224"), load(path, img_size=96)):
        assert loaded.num_classes == 7
        assert torch.equal(loaded.model.head.weight, model.head.weight)
        assert torch.equal(loaded.model.head.bias, model.head.bias)
    assert torch.equal(at_size(load(path), 32).model.head.weight, model.head.weight)


@pytest.mark.parametrize(
    "arch,args,prefix",
    [
        ("vit_tiny_patch16_224", {}, 1),
        ("deit_tiny_distilled_patch16_224", {}, 2),
        ("vit_tiny_patch16_224", REG_ARGS, 0),
        ("vit_tiny_patch16_224", dict(reg_tokens=2), 3),
        ("deit3_small_patch16_224", {"depth": 1}, 0),
        ("eva02_tiny_patch14_224", {"depth": 1}, 1),
        ("flexivit_small", {"depth": 1}, 0),
    ],
)
def test_at_size_resamples_the_grid_as_timm_does_and_keeps_prefix_rows(
    arch, args, prefix, tmp_path
):
    patch = 14 if arch.startswith("eva") else 16
    size, new = 4 * patch, 6 * patch  # 1.5x native
    model = random_model(arch, size, **args)
    path = tmp_path / "w.safetensors"
    save_file(plain_sd(model), path)
    loaded = load(path, arch=arch, model_args=dict(args) or None)
    big = at_size(loaded, new)
    src = model.pos_embed.detach()
    pos = big.model.pos_embed.detach()
    assert pos.shape[1] == prefix + 36
    assert torch.equal(pos[:, :prefix], src[:, :prefix])  # byte for byte
    interp, aa = ("bilinear", False) if arch.startswith("flexivit") else ("bicubic", True)
    want = resample_abs_pos_embed(
        src, [6, 6], [4, 4], num_prefix_tokens=prefix, interpolation=interp, antialias=aa
    )
    assert torch.equal(pos, want)
    # timm's own loader, at the new size, from the same file, agrees on every weight.
    with SkipParamInit():  # every parameter comes from the file
        ref = timm.create_model(
            arch,
            pretrained=True,
            pretrained_cfg_overlay=dict(
                file=str(path), num_classes=model.num_classes, input_size=(3, size, size)
            ),
            img_size=new,
            num_classes=model.num_classes,
            **args,
        )
    assert torch.equal(ref.pos_embed, pos)
    x = torch.randn(1, 3, new, new)
    with torch.no_grad():
        assert torch.allclose(big.model(x), ref.eval()(x), atol=1e-6)
    assert big.img_size == (new, new) and big.native_size == (size, size)
    assert big.data_config["input_size"] == (3, new, new)
    assert loaded.model.pos_embed.shape[1] == prefix + 16  # the original is left alone


def test_at_size_non_square(vit_file):
    path, model = vit_file
    loaded = at_size(load(path), (64, 96))
    want = resample_abs_pos_embed(model.pos_embed.detach(), [4, 6], [4, 4], num_prefix_tokens=1)
    assert torch.equal(loaded.model.pos_embed, want)
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 3, 64, 96)).shape == (1, 7)


def test_non_square_native_size_from_config(tmp_path):
    args = {"img_size": [48, 64], "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}
    model = random_model("vit_tiny_patch16_224", 0, **args)
    save_file(plain_sd(model), tmp_path / "model.safetensors")
    cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 1000, "model_args": args}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load(tmp_path)
    assert loaded.native_size == (48, 64)
    sq = at_size(loaded, 64)
    want = resample_abs_pos_embed(model.pos_embed.detach(), [4, 4], [3, 4], num_prefix_tokens=1)
    assert torch.equal(sq.model.pos_embed, want)


@pytest.mark.parametrize(
    "arch,args,size,new",
    [
        ("pit_ti_224", {}, 64, 96),
        ("cait_xxs24_224", {"depth": 2, "depth_token_only": 1}, 64, 96),
        ("beit_base_patch16_224", {"depth": 1}, 64, 96),
        ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}, 64, 96),
        ("resnet18", {}, 64, 100),
    ],
)
def test_at_size_runs_forward_for_hand_resampled_and_relative_bias_families(
    arch, args, size, new, tmp_path
):
    model = random_model(arch, size, **args)
    path = tmp_path / "w.safetensors"
    save_file(plain_sd(model), path)
    loaded = load(path, arch=arch, model_args=args or None, img_size=size)
    big = at_size(loaded, new)
    with torch.no_grad():
        out = big.model(torch.randn(2, 3, new, new))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    if arch.startswith("pit"):  # channels-first table, resampled by hand
        src = model.pos_embed.detach()
        h = (new - 16) // 8 + 1
        want = torch.nn.functional.interpolate(
            src, size=(h, h), mode="bicubic", antialias=True, align_corners=False
        )
        assert torch.allclose(big.model.pos_embed, want, atol=1e-6)
    if arch.startswith("cait"):  # grid-only table, resampled by hand
        want = resample_abs_pos_embed(model.pos_embed.detach(), [6, 6], [4, 4], 0)
        assert torch.equal(big.model.pos_embed, want)


def test_invalid_size_names_the_nearest_valid_sizes(vit_file):
    path, _ = vit_file
    loaded = load(path)
    assert valid_sizes_near(loaded, 100) == [96, 112]
    assert valid_sizes_near(loaded, 96) == [96]
    with pytest.raises(VitdiagError) as e:
        at_size(loaded, 100)
    assert "96" in str(e.value) and "112" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(VitdiagError, match="96, 112"):
        load(path, img_size=100)


def test_swin_sizes_step_by_patch_times_its_patch_merges():
    # Patch 4 and three merging stages: a side must divide by 4 * 2**3 = 32, which the family
    # table says (patch_merging), not a test of the architecture's name.
    loaded = load(None, arch="swin_tiny_patch4_window7_224", model_args={"depths": (1, 1, 1, 1)})
    assert valid_sizes_near(loaded, 100) == [96, 128]
    assert valid_sizes_near(loaded, 224) == [224]
    with pytest.raises(VitdiagError, match="96, 128"):
        at_size(loaded, 100)
    assert loaded.family.patch_merging


# --------------------------------------------------------------------------- bad input


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _bad_inputs(tmp: Path, vit_path: Path) -> dict:
    cases = {}
    cases["missing path"] = (tmp / "nope.safetensors", {}, tmp / "nope.safetensors")
    empty_dir = tmp / "no_weights"
    empty_dir.mkdir()
    (empty_dir / "notes.txt").write_text("hello")
    cases["directory without weights"] = (empty_dir, {}, empty_dir)
    rnd = tmp / "random.pt"
    rnd.write_bytes(random.Random(0).randbytes(4096))
    cases["random bytes"] = (rnd, {}, rnd)
    rnd_st = tmp / "random.safetensors"
    rnd_st.write_bytes(random.Random(1).randbytes(4096))
    cases["random bytes safetensors"] = (rnd_st, {}, rnd_st)
    trunc = tmp / "truncated.safetensors"
    data = vit_path.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    cases["truncated safetensors"] = (trunc, {}, trunc)
    empty = tmp / "empty.pth"
    empty.write_bytes(b"")
    cases["empty file"] = (empty, {}, empty)
    evil = tmp / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(tmp / "PWNED_A")}, evil)
    cases["code payload (torch.save)"] = (evil, {}, evil)
    evil2 = tmp / "evil2.pth"
    with open(evil2, "wb") as fh:
        pickle.dump(_Payload(tmp / "PWNED_B"), fh)
    cases["code payload (pickle)"] = (evil2, {}, evil2)
    nofit = tmp / "nofit.safetensors"
    save_file({"foo.weight": torch.zeros(3, 3), "bar.bias": torch.zeros(3)}, nofit)
    cases["fits no architecture"] = (nofit, {}, nofit)
    vit_nofit = tmp / "vit_nofit.safetensors"
    sd = {k: v for k, v in load_sd(vit_path).items()}
    sd["dist_token"] = torch.zeros(1, 1, 192)  # a ViT-looking dict no registered ViT has
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(100, 192)
    save_file(sd, vit_nofit)
    cases["ViT-like, fits nothing"] = (vit_nofit, {}, vit_nofit)
    cases["arch does not fit"] = (vit_path, {"arch": "vit_small_patch16_224"}, vit_path)
    cases["unknown arch"] = (vit_path, {"arch": "vit_tiny_patch16_22"}, "vit_tiny_patch16_224")
    cases["size the grid cannot take"] = (vit_path, {"img_size": 70}, "64, 80")
    bad_cfg = tmp / "bad_cfg"
    bad_cfg.mkdir()
    save_file(load_sd(vit_path), bad_cfg / "model.safetensors")
    (bad_cfg / "config.json").write_text("{not json")
    cases["config.json not JSON"] = (bad_cfg, {}, bad_cfg / "config.json")
    cases["ema asked, none there"] = (vit_path, {"ema": True}, vit_path)
    cases["native size contradicts the table"] = (vit_path, {"native_size": 96}, "--native-size")
    return cases


def load_sd(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


BAD = [
    "missing path",
    "directory without weights",
    "random bytes",
    "random bytes safetensors",
    "truncated safetensors",
    "empty file",
    "code payload (torch.save)",
    "code payload (pickle)",
    "fits no architecture",
    "ViT-like, fits nothing",
    "arch does not fit",
    "unknown arch",
    "size the grid cannot take",
    "config.json not JSON",
    "ema asked, none there",
    "native size contradicts the table",
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, vit_file):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, _bad_inputs(tmp, vit_file[0])


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_one_sentence_naming_the_file(bad_inputs, case):
    tmp, cases = bad_inputs
    path, kwargs, named = cases[case]
    with pytest.raises(VitdiagError) as e:
        load(path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith((".", "?"))
    assert str(named) in msg
    assert not (tmp / "PWNED_A").exists() and not (tmp / "PWNED_B").exists()
    if case.startswith("code payload"):
        assert "--unsafe-pickle" in msg
    if case == "arch does not fit":  # the first mismatched tensor, both shapes
        assert "cls_token" in msg and "(1, 1, 192)" in msg and "(1, 1, 384)" in msg


def test_fixture_checkpoint_is_decided_by_its_config():
    path = ROOT / "fixtures" / "models" / "vit_nomix"
    if not (path / "config.json").is_file():
        pytest.skip("fixtures/models/vit_nomix has not been built")
    loaded = load(path)
    assert "config.json" in loaded.provenance["decided_by"]
    assert loaded.native_size == (32, 32) and loaded.img_size == (32, 32)


def test_random_init_of_a_live_module_is_the_same_network_redrawn():
    # A live module records no build arguments: the reference must keep its depth and patch size.
    from vitdiag.model import from_module, random_init_like

    net = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
    ).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ref = random_init_like(from_module(net), seed=3).model
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in before.items()}
    assert not torch.equal(
        ref.state_dict()["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"]
    )
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # untouched
    again = random_init_like(from_module(net), seed=3).model
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ref.state_dict().items())
