"""Data sources, decoding, unreadable files, sampling, sharding and the eval transform."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
import torchvision
from PIL import Image

from vitdiag.data import (
    IMAGE_EXTENSIONS,
    Batch,
    UnreadableImageError,
    eval_transform,
    make_loader,
    open_dataset,
    select_indices,
)
from vitdiag.errors import VitdiagError

CFG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.9,
    "crop_mode": "center",
}
REPO = Path(__file__).resolve().parents[1]


def _save(path: Path, color=(120, 60, 30), size=(40, 30), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def _noise_jpeg(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)
    return path


def _imagefolder(root: Path, classes=("cat", "ant", "bee"), per_class=4) -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            _save(root / c / f"{i:02d}.png", color=(10 * ci, 20 * i, 5))
    return root


def _collect(loader) -> tuple[torch.Tensor, torch.Tensor, int]:
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    images = torch.cat([b.images for b in batches])
    targets = torch.cat([b.targets for b in batches])
    return images, targets, sum(b.n_unreadable for b in batches)


def _one_line_error(exc_info, *needles: object) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


# --- sources ----------------------------------------------------------------------------------


def test_imagefolder_is_labelled_by_sorted_class_folders(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "ds")
    src = open_dataset(root)
    assert (src.kind, src.labelled, src.synthetic, len(src)) == ("imagefolder", True, False, 12)
    assert src.classes == ["ant", "bee", "cat"]
    images, targets, bad = _collect(make_loader(src, eval_transform(CFG, 32), batch_size=5))
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32
    assert targets.dtype == torch.int64
    assert targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert bad == 0
    desc = src.describe()
    json.dumps(desc)
    assert desc["n_images"] == 12 and desc["classes"] == ["ant", "bee", "cat"]
    assert desc["path"] == str(root.resolve())


def test_flat_folder_is_unlabelled_and_ignores_hidden_and_other_files(tmp_path: Path) -> None:
    for i, ext in enumerate(IMAGE_EXTENSIONS):
        _save(tmp_path / f"img{i}{ext.upper() if i % 2 else ext}")
    _save(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_dataset(tmp_path)
    assert (src.kind, src.labelled, src.classes, len(src)) == ("flat", False, None, 9)
    images, targets, bad = _collect(make_loader(src, eval_transform(CFG, 16), batch_size=4))
    assert images.shape == (9, 3, 16, 16) and bad == 0
    assert (targets == -1).all()


def test_folder_with_a_single_subfolder_is_unlabelled(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / "images" / f"{i}.png")
    src = open_dataset(tmp_path)
    assert not src.labelled and len(src) == 3


def test_split_selects_the_split_folder_and_its_synonyms(tmp_path: Path) -> None:
    _imagefolder(tmp_path / "train", per_class=2)
    _imagefolder(tmp_path / "validation", classes=("x", "y"), per_class=1)
    assert open_dataset(tmp_path, split="train").classes == ["ant", "bee", "cat"]
    assert open_dataset(tmp_path, split="val").classes == ["x", "y"]
    with pytest.raises(VitdiagError) as err:
        open_dataset(tmp_path)  # train/ + validation/ are splits, not classes
    _one_line_error(err, tmp_path, "--split")
    with pytest.raises(VitdiagError) as err:
        open_dataset(tmp_path, split="test")
    _one_line_error(err, tmp_path, "test")


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _png_bytes(color=(1, 2, 3), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (20, 20), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("workers", [0, 2])
def test_tar_is_labelled_by_member_parent_folder(tmp_path: Path, workers: int) -> None:
    members = {
        f"./val/{c}/{i}.png": _png_bytes((ci * 50, i, 0))
        for ci, c in enumerate("zy")
        for i in range(3)
    }
    members["./val/z/._0.png"] = b"AppleDouble junk"
    members["./val/README.txt"] = b"text"
    src = open_dataset(_tar(tmp_path / "data.tar", members))
    assert (src.kind, src.labelled, src.classes, len(src)) == ("tar", True, ["y", "z"], 6)
    loader = make_loader(src, eval_transform(CFG, 24), batch_size=4, workers=workers)
    images, targets, bad = _collect(loader)
    assert images.shape == (6, 3, 24, 24) and bad == 0
    assert targets.tolist() == [0, 0, 0, 1, 1, 1]
    # pixel colour check: class z was saved with red = 0, class y with red = 50
    red = images[:, 0].mean(dim=(1, 2))
    assert (red[:3] > red[3:]).all()


def test_tar_with_one_parent_folder_is_unlabelled(tmp_path: Path) -> None:
    src = open_dataset(_tar(tmp_path / "x.TAR", {f"imgs/{i}.png": _png_bytes() for i in range(3)}))
    assert src.kind == "tar" and not src.labelled and src.classes is None
    _, targets, _ = _collect(make_loader(src, eval_transform(CFG, 16)))
    assert targets.tolist() == [-1, -1, -1]


def test_timm_torchvision_folder_source(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "ds", per_class=2)
    src = open_dataset(f"torch/folder:{root}")
    assert src.kind == "timm" and src.labelled and src.classes == ["ant", "bee", "cat"]
    images, targets, _ = _collect(make_loader(src, eval_transform(CFG, 16), batch_size=4))
    assert images.shape == (6, 3, 16, 16)
    assert targets.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("torch/nosuchset:{tmp}", "nosuchset"),
        ("torch/cifar10:{tmp}", "torch/cifar10"),
        ("torch/cifar10", "ROOT"),
        ("torch/cifar10:{tmp}/missing", "missing"),
        ("hfds/some/dataset", "not in the local Hugging Face hub cache"),
        ("wds/some-shards", "does not exist"),
    ],
)
def test_timm_source_errors_are_vitdiag_errors(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(VitdiagError) as err:
        open_dataset(text.format(tmp=tmp_path))
    _one_line_error(err, needle)


# --- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mode", "color"),
    [
        ("gray.png", "L", 77),
        ("gray16.png", "I;16", 40000),
        ("bits.png", "1", 1),
        ("rgba.png", "RGBA", (200, 100, 50, 0)),
        ("la.png", "LA", (90, 10)),
        ("pal.gif", "P", 3),
        ("cmyk.jpg", "CMYK", (0, 0, 0, 0)),
        ("gray.tiff", "L", 5),
        ("pic.bmp", "RGB", (1, 2, 3)),
        ("pic.webp", "RGB", (1, 2, 3)),
        ("pic.ppm", "RGB", (1, 2, 3)),
    ],
)
def test_every_image_mode_becomes_three_channels(tmp_path: Path, name, mode, color) -> None:
    _save(tmp_path / name, color=color, mode=mode)
    src = open_dataset(tmp_path)
    assert src[0][0].mode == "RGB"
    images, _, bad = _collect(make_loader(src, eval_transform(CFG, 20)))
    assert images.shape == (1, 3, 20, 20) and bad == 0


def _expected(rgb, cfg=CFG) -> torch.Tensor:
    v = torch.tensor(rgb, dtype=torch.float64) / 255
    return (v - torch.tensor(cfg["mean"], dtype=torch.float64)) / torch.tensor(
        cfg["std"], dtype=torch.float64
    )


def _pixel(tmp_path: Path) -> torch.Tensor:
    images, _, _ = _collect(make_loader(open_dataset(tmp_path), eval_transform(CFG, 8)))
    return images[0, :, 4, 4].double()


def test_alpha_is_dropped_not_composited(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", color=(200, 100, 50, 0), mode="RGBA")
    assert torch.allclose(_pixel(tmp_path), _expected((200, 100, 50)), atol=1e-5)


def test_palette_with_transparency_keeps_palette_colour(tmp_path: Path) -> None:
    img = Image.new("P", (12, 12), 0)
    img.putpalette([10, 200, 30] + [0] * 765)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert torch.allclose(_pixel(tmp_path), _expected((10, 200, 30)), atol=1e-5)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    _save(tmp_path / "g.png", color=257 * 100, mode="I;16")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    assert torch.allclose(_pixel(tmp_path), _expected((100, 100, 100)), atol=1e-5)


# --- unreadable files ---------------------------------------------------------------------------


def _with_bad_files(root: Path) -> dict[str, Path]:
    for i in range(5):
        _noise_jpeg(root / f"good{i}.jpg", seed=i)
    full = _noise_jpeg(root / "tmp.jpg", seed=9).read_bytes()
    (root / "tmp.jpg").unlink()
    bad = {
        "corrupt": root / "corrupt.png",
        "truncated": root / "truncated.jpg",
        "empty": root / "empty.jpg",
    }
    bad["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    bad["truncated"].write_bytes(full[: len(full) // 2])
    bad["empty"].write_bytes(b"")
    return bad


@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_files_are_skipped_and_counted(tmp_path: Path, batch_size, workers) -> None:
    _with_bad_files(tmp_path)
    src = open_dataset(tmp_path)
    assert len(src) == 8
    loader = make_loader(src, eval_transform(CFG, 16), batch_size=batch_size, workers=workers)
    batches = list(loader)
    assert all(b.images.shape[0] > 0 for b in batches)
    assert sum(b.images.shape[0] for b in batches) == 5
    assert sum(b.n_unreadable for b in batches) == 3
    names = sorted(Path(n).name for b in batches for n in b.unreadable)
    assert names == ["corrupt.png", "empty.jpg", "truncated.jpg"]


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty"])
def test_strict_raises_naming_the_unreadable_file(tmp_path: Path, kind: str) -> None:
    bad = _with_bad_files(tmp_path)
    for other, path in bad.items():
        if other != kind:
            path.unlink()
    loader = make_loader(open_dataset(tmp_path, strict=True), eval_transform(CFG, 16), workers=0)
    with pytest.raises(UnreadableImageError) as err:
        list(loader)
    _one_line_error(err, bad[kind])
    assert isinstance(err.value, VitdiagError)


def test_strict_raises_cleanly_with_workers(tmp_path: Path) -> None:
    bad = _with_bad_files(tmp_path)
    src = open_dataset(tmp_path, strict=True)
    with pytest.raises(UnreadableImageError) as err:
        list(make_loader(src, eval_transform(CFG, 16), batch_size=2, workers=2))
    # loader order is sorted file order: corrupt.png comes first
    _one_line_error(err, bad["corrupt"])


def test_all_unreadable_raises_when_the_loader_ends(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_text("hello")
    loader = make_loader(open_dataset(tmp_path), eval_transform(CFG, 16), batch_size=1)
    with pytest.raises(VitdiagError) as err:
        list(loader)
    _one_line_error(err, tmp_path, "All 2 images", "a.jpg")


# --- input errors -------------------------------------------------------------------------------


def _bad_sources(tmp: Path) -> dict[str, Path]:
    (tmp / "empty").mkdir()
    (tmp / "noimages").mkdir()
    (tmp / "noimages" / "a.txt").write_text("x")
    (tmp / "noimages" / "sub").mkdir()
    (tmp / "noimages" / "sub" / "b.csv").write_text("x")
    (tmp / "garbage.tar").write_bytes(b"not a tar at all" * 64)
    (tmp / "zero.tar").write_bytes(b"")
    full = _tar(tmp / "full.tar", {f"a/{i}.png": _png_bytes() for i in range(4)}).read_bytes()
    (tmp / "cut.tar").write_bytes(full[:1000])
    _tar(tmp / "noimg.tar", {"a/readme.txt": b"x", "b/.hidden.png": _png_bytes()})
    (tmp / "notes.txt").write_text("x")
    (tmp / "x.tar.gz").write_bytes(b"x")
    _save(tmp / "single.png")
    return {
        "missing": tmp / "does-not-exist",
        "empty": tmp / "empty",
        "noimages": tmp / "noimages",
        "garbage_tar": tmp / "garbage.tar",
        "zero_tar": tmp / "zero.tar",
        "cut_tar": tmp / "cut.tar",
        "tar_without_images": tmp / "noimg.tar",
        "other_file": tmp / "notes.txt",
        "compressed_tar": tmp / "x.tar.gz",
        "single_image": tmp / "single.png",
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "noimages",
        "garbage_tar",
        "zero_tar",
        "cut_tar",
        "tar_without_images",
        "other_file",
        "compressed_tar",
        "single_image",
    ],
)
def test_bad_sources_raise_one_line_vitdiag_error_naming_the_path(tmp_path: Path, case) -> None:
    path = _bad_sources(tmp_path)[case]
    with pytest.raises(VitdiagError) as err:
        open_dataset(path)
    msg = _one_line_error(err, path)
    if case == "noimages":
        assert ".jpg" in msg and ".webp" in msg
    if case == "empty":
        assert "empty" in msg


def test_mixed_class_folders_and_loose_images_is_an_error(tmp_path: Path) -> None:
    _imagefolder(tmp_path, per_class=1)
    _save(tmp_path / "loose.png")
    with pytest.raises(VitdiagError) as err:
        open_dataset(tmp_path)
    _one_line_error(err, tmp_path, "loose.png")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"limit": 0}, "--limit"), ({"limit": -3}, "-3"), ({"batch_size": 0}, "--batch-size")],
)
def test_bad_loader_options_raise(tmp_path: Path, kwargs, needle) -> None:
    src = open_dataset(_imagefolder(tmp_path, per_class=1))
    with pytest.raises(VitdiagError) as err:
        make_loader(src, eval_transform(CFG, 16), **kwargs)
    _one_line_error(err, needle)


@pytest.mark.parametrize("text", ["synthetic:0", "synthetic:-1", "synthetic:abc"])
def test_bad_synthetic_count_raises(text: str) -> None:
    with pytest.raises(VitdiagError) as err:
        open_dataset(text)
    _one_line_error(err, text)


# --- synthetic ----------------------------------------------------------------------------------


def test_synthetic_is_seeded_unit_gaussian_at_the_transform_size() -> None:
    src = open_dataset("synthetic:10", seed=3)
    assert (src.kind, src.synthetic, src.labelled, len(src)) == ("synthetic", True, False, 10)
    images, targets, bad = _collect(make_loader(src, eval_transform(CFG, (48, 64)), batch_size=4))
    assert images.shape == (10, 3, 48, 64) and bad == 0
    assert (targets == -1).all()
    assert abs(images.mean().item()) < 0.02 and abs(images.std().item() - 1) < 0.02
    desc = src.describe()
    json.dumps(desc)
    assert desc["synthetic"] and desc["seed"] == 3 and desc["size"] == [48, 64]
    again, _, _ = _collect(
        make_loader(open_dataset("synthetic:10", seed=3), eval_transform(CFG, (48, 64)))
    )
    other, _, _ = _collect(
        make_loader(open_dataset("synthetic:10", seed=4), eval_transform(CFG, (48, 64)))
    )
    assert torch.equal(images, again) and not torch.equal(images, other)


def test_synthetic_is_identical_across_batch_sizes_and_workers() -> None:
    tf = eval_transform(CFG, 16)
    runs = [
        _collect(
            make_loader(open_dataset("synthetic", synthetic_count=13), tf, batch_size=bs, workers=w)
        )[0]
        for bs, w in [(1, 0), (4, 0), (64, 0), (4, 2)]
    ]
    assert runs[0].shape == (13, 3, 16, 16)
    for other in runs[1:]:
        assert torch.equal(runs[0], other)


def test_synthetic_limit_is_a_prefix() -> None:
    tf = eval_transform(CFG, 16)
    full, _, _ = _collect(make_loader(open_dataset("synthetic:8"), tf))
    part, _, _ = _collect(make_loader(open_dataset("synthetic:8"), tf, limit=3, seed=99))
    assert torch.equal(part, full[:3])


# --- limit, order, shards -----------------------------------------------------------------------


def test_limit_with_seed_is_a_fair_subset_independent_of_batch_size(tmp_path: Path) -> None:
    src = open_dataset(_imagefolder(tmp_path, classes=("a", "b", "c", "d", "e"), per_class=6))
    tf = eval_transform(CFG, 8)
    runs = [_collect(make_loader(src, tf, limit=10, seed=1, batch_size=bs)) for bs in (1, 3, 10)]
    for images, targets, _ in runs[1:]:
        assert torch.equal(images, runs[0][0]) and torch.equal(targets, runs[0][1])
    assert runs[0][0].shape[0] == 10
    assert len(set(runs[0][1].tolist())) >= 3
    other = make_loader(src, tf, limit=10, seed=2).indices
    assert sorted(other) != sorted(make_loader(src, tf, limit=10, seed=1).indices)
    assert src.describe()["limit"] == 10


def test_without_limit_the_order_is_the_sorted_file_order(tmp_path: Path) -> None:
    src = open_dataset(_imagefolder(tmp_path, per_class=3))
    loader = make_loader(src, eval_transform(CFG, 8), batch_size=4)
    assert loader.indices == list(range(9))
    idx = torch.cat([b.indices for b in loader])
    assert idx.tolist() == list(range(9))


@pytest.mark.parametrize("limit", [None, 7])
def test_shards_are_disjoint_and_cover_the_whole_selection(tmp_path: Path, limit) -> None:
    src = open_dataset(_imagefolder(tmp_path, per_class=4))
    tf = eval_transform(CFG, 8)
    whole = make_loader(src, tf, limit=limit, seed=5)
    shards = [make_loader(src, tf, limit=limit, seed=5, rank=r, world_size=3) for r in range(3)]
    sets = [set(s.indices) for s in shards]
    assert sum(len(s.indices) for s in shards) == len(whole.indices) == (limit or 12)
    assert set().union(*sets) == set(whole.indices)
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    whole_sum = _collect(whole)[0].double().sum()
    shard_sum = sum(_collect(s)[0].double().sum() for s in shards)
    assert torch.allclose(whole_sum, shard_sum)


# --- eval transform -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [48, (48, 64)])
def test_eval_transform_matches_timm_create_transform(tmp_path: Path, size) -> None:
    img = Image.open(_noise_jpeg(tmp_path / "x.jpg")).convert("RGB").resize((70, 90))
    ours = eval_transform(CFG, size)(img)
    hw = (size, size) if isinstance(size, int) else size
    timm_tf = timm.data.create_transform(
        input_size=(3, *hw),
        is_training=False,
        interpolation=CFG["interpolation"],
        mean=CFG["mean"],
        std=CFG["std"],
        crop_pct=CFG["crop_pct"],
        crop_mode=CFG["crop_mode"],
    )
    assert ours.shape == (3, *hw)
    assert torch.equal(ours, timm_tf(img))


def test_eval_transform_overrides_and_records_its_config() -> None:
    tf = eval_transform(
        CFG,
        (32, 40),
        mean=0.5,
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="squash",
    )
    assert tf.size == (32, 40)
    assert tf.config["mean"] == (0.5, 0.5, 0.5) and tf.config["crop_mode"] == "squash"
    assert tf.config["input_size"] == (3, 32, 40)
    json.dumps(tf.config)
    out = tf(Image.new("RGB", (50, 20), (255, 0, 128)))
    assert out.shape == (3, 32, 40)
    assert torch.allclose(out[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-5)
    with pytest.raises(VitdiagError):
        eval_transform(CFG, 32, interpolation="sideways")
    with pytest.raises(VitdiagError):
        eval_transform(CFG, 32, crop_mode="diagonal")


def test_normalised_constant_colour_equals_closed_form(tmp_path: Path) -> None:
    rgb = (200, 37, 91)
    _save(tmp_path / "c.png", color=rgb, size=(61, 47))
    images, _, _ = _collect(make_loader(open_dataset(tmp_path), eval_transform(CFG, (24, 32))))
    expected = _expected(rgb)
    per_channel_mean = images[0].double().mean(dim=(1, 2))
    per_channel_std = images[0].double().std(dim=(1, 2))
    assert torch.allclose(per_channel_mean, expected, atol=1e-5)
    assert torch.all(per_channel_std < 1e-6)


# --- fixture ------------------------------------------------------------------------------------


def test_fixture_val_split_is_labelled_with_its_class_folders() -> None:
    val = REPO / "fixtures" / "data" / "val"
    if not val.is_dir():
        pytest.skip("fixtures/data/val has not been generated")
    src = open_dataset(val)
    expected = sorted(p.name for p in val.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert src.labelled and src.kind == "imagefolder" and src.classes == expected
    assert open_dataset(val.parent, split="val").classes == expected
    reference = torchvision.datasets.ImageFolder(val)
    assert src.classes == reference.classes and len(src) == len(reference)


def test_per_class_subsample_takes_n_of_each_class_and_is_seeded():
    targets = [0] * 10 + [1] * 3 + [2] * 7
    picked = select_indices(len(targets), per_class=4, seed=5, targets=targets)
    counts = {c: sum(targets[i] == c for i in picked) for c in (0, 1, 2)}
    assert counts == {0: 4, 1: 3, 2: 4}
    assert len(set(picked)) == len(picked)
    assert picked == select_indices(len(targets), per_class=4, seed=5, targets=targets)
    shards = [
        select_indices(len(targets), per_class=4, seed=5, targets=targets, rank=r, world_size=2)
        for r in range(2)
    ]
    assert sorted(shards[0] + shards[1]) == sorted(picked)
    with pytest.raises(VitdiagError, match="labelled"):
        select_indices(5, per_class=2)


# -- the eval transform's 8-bit crop, views from workers, worker pools ----------------------


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_crop_then_normalise_is_the_eval_transform_bit_for_bit(tmp_path, crop_mode):
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (53, 71, 3), dtype=np.uint8), "RGB")
    t = eval_transform(CFG, 32, crop_mode=crop_mode)
    crop = t.crop(img)
    assert isinstance(crop, Image.Image) and crop.size == (32, 32) and crop.mode == "RGB"
    assert torch.equal(t.normalise(crop), t(img))


def _pid_views(image, crop, clean, index):
    """A view maker that says which process made it, and what it was given."""
    return {
        "pid": torch.tensor(os.getpid()),
        "index": torch.tensor(index),
        "crop_side": torch.tensor(crop.size[0] if crop is not None else -1),
        "clean": clean.clone(),
    }


def test_views_come_from_the_workers_beside_the_clean_batch(tmp_path):
    root = tmp_path / "d"
    for i in range(6):
        _save(root / f"c{i % 2}" / f"{i}.png", color=(10 * i, 20, 30))
    t = eval_transform(CFG, 16)
    loader = make_loader(open_dataset(str(root)), t, batch_size=2, workers=2, views=_pid_views)
    assert loader.workers == 2
    first = [(b.views["pid"].tolist(), b.indices.tolist()) for b in loader]
    for batch in loader:
        assert torch.equal(batch.views["index"], batch.indices)
        assert torch.equal(batch.views["clean"], batch.images)  # the crop made the clean input
        assert batch.views["crop_side"].tolist() == [16] * len(batch.indices)
    pids = {p for ps, _ in first for p in ps}
    assert os.getpid() not in pids and len(pids) == 2
    # persistent: a second pass over the same loader is served by the same worker processes
    again = {p for b in loader for p in b.views["pid"].tolist()}
    assert again == pids


def test_workers_are_not_started_where_nothing_can_overlap(tmp_path):
    root = tmp_path / "d"
    for i in range(6):
        _save(root / f"c{i % 2}" / f"{i}.png")
    source = open_dataset(str(root))
    t = eval_transform(CFG, 16)
    assert make_loader(source, t, batch_size=8, workers=4).workers == 0  # one batch
    assert make_loader(source, t, batch_size=3, workers=4).workers == 2  # two batches
    assert make_loader(source, t, batch_size=1, workers=4).workers == 4
    loader = make_loader(source, t, batch_size=3, workers=0, views=_pid_views)
    assert {p for b in loader for p in b.views["pid"].tolist()} == {os.getpid()}
    assert make_loader(source, t, pin_memory=False)._loader.pin_memory is False


def test_default_workers_is_half_the_usable_cpus_at_most_8():
    from vitdiag.hardware import default_workers, usable_cpus
    from vitdiag.runner import Settings

    assert default_workers() == min(8, usable_cpus() // 2)
    assert Settings().workers == default_workers()
