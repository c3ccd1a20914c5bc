"""Hugging Face datasets are a source: a save_to_disk folder, a Parquet folder and hfds/NAME in
the local hub cache give the numbers of the same images as an image folder; class names come
from the ClassLabel and are matched by name; every bad split or column is refused in one line;
nothing is downloaded and nothing is written into the data folder."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import socket
from pathlib import Path

import pytest
from tolerances import FORWARD_RTOL

datasets = pytest.importorskip("datasets")

from typer.testing import CliRunner  # noqa: E402

import vitdiag  # noqa: E402
from vitdiag.cli import app  # noqa: E402
from vitdiag.data import (  # noqa: E402
    UnreadableImageError,
    class_order,
    eval_transform,
    make_loader,
    open_dataset,
)
from vitdiag.errors import VitdiagError  # noqa: E402
from vitdiag.runner import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT / "fixtures" / "data" / "val"
MODEL = ROOT / "fixtures" / "models" / "vit_nomix"
CLASSES = class_order(p.name for p in VAL.iterdir())
# Every image of the fixture folder with its class index (timm's folder order).
IMAGES = [(f, c) for c, name in enumerate(CLASSES) for f in sorted((VAL / name).glob("*.jpg"))]
REPO_ID = "someone/fixture-val"
REV = "0123456789abcdef0123456789abcdef01234567"
CFG = {
    "input_size": (3, 16, 16),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def _features(names=CLASSES, **extra):
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names)), **extra}
    )


def _dataset(names=CLASSES, order=None, count=None, corrupt=()) -> datasets.Dataset:
    """The fixture images with a ClassLabel of `names`; `order[c]` is the ClassLabel index of
    folder class c (a consistent relabelling); images listed in `corrupt` hold junk bytes."""
    chosen = IMAGES[:count] if count is not None else IMAGES
    rows = {
        "image": [
            {"bytes": b"not an image" if i in corrupt else f.read_bytes(), "path": None}
            for i, (f, _) in enumerate(chosen)
        ],
        "label": [order[c] if order else c for _, c in chosen],
    }
    return datasets.Dataset.from_dict(rows, features=_features(names))


def _hub_layout(cache: Path, ds: datasets.Dataset, repo_id: str = REPO_ID) -> Path:
    """The layout huggingface_hub leaves after `hf download REPO --repo-type dataset`."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REV
    (snapshot / "data").mkdir(parents=True)
    ds.to_parquet(str(snapshot / "data" / "validation-00000-of-00001.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snapshot


@pytest.fixture(autouse=True)
def offline(tmp_path_factory, monkeypatch):
    """Offline, with the hub cache and the datasets cache in tmp: nothing outside is read."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(base / "hub-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(base / "datasets-cache"))


@pytest.fixture(scope="module")
def spelled(tmp_path_factory) -> dict[str, str]:
    """The fixture images as a DatasetDict saved to disk, a hub-style Parquet folder and a hub
    cache snapshot (hfds/NAME)."""
    root = tmp_path_factory.mktemp("hf")
    ds = _dataset()
    datasets.DatasetDict({"validation": ds, "train": _dataset(count=20)}).save_to_disk(
        str(root / "disk")
    )
    (root / "parquet" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "parquet" / "data" / "validation-00000-of-00001.parquet"))
    _dataset(count=20).to_parquet(str(root / "parquet" / "data" / "train-00000-of-00001.parquet"))
    _hub_layout(tmp_path_factory.getbasetemp() / "hub-cache", ds)
    return {"disk": str(root / "disk"), "parquet": str(root / "parquet"), "hub": f"hfds/{REPO_ID}"}


def _run(source, **settings):
    s = Settings(device="cpu", workers=0, batch_size=64, **settings)
    found = vitdiag.run_all(
        vitdiag.load(str(MODEL)), source, probes={"eval", "collapse"}, settings=s
    )
    return {r.probe: r.metrics for r in found}, found.data


def _same(a: dict, b: dict) -> None:
    assert a["eval"]["n_images"] == b["eval"]["n_images"]
    assert a["eval"]["top1"] == b["eval"]["top1"]  # a count: exact
    for probe, key in (("eval", "nll"), ("collapse", "nc1")):
        assert math.isclose(a[probe][key], b[probe][key], rel_tol=FORWARD_RTOL), (probe, key)


@pytest.fixture(scope="module")
def folder_numbers():
    return _run(open_dataset(str(VAL)))[0]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("spelling", ["disk", "parquet", "hub"])
def test_each_spelling_gives_the_numbers_of_the_same_images_as_a_folder(
    spelling, spelled, folder_numbers
):
    text = spelled[spelling]
    before = _files(Path(text)) if spelling != "hub" else None
    source = open_dataset(text)
    assert source.kind == "hf" and source.split == "validation" and len(source) == len(IMAGES)
    assert source.classes == CLASSES and source.labelled
    got, data = _run(source)
    _same(got, folder_numbers)
    assert 0.9 < got["eval"]["top1"] < 1.0  # labels reached their outputs (chance is 0.1)
    assert data["data"]["image_column"] == "image" and data["data"]["label_column"] == "label"
    if spelling == "hub":
        assert data["data"]["repo_id"] == REPO_ID and data["data"]["revision"] == REV
    else:  # the Arrow copy of the Parquet files went to HF_DATASETS_CACHE, not beside them
        assert _files(Path(text)) == before
    if spelling != "disk":  # only the split read was converted, and provenance names its file
        assert data["data"]["files"] == ["data/validation-00000-of-00001.parquet"]
        assert sorted(data["data"]["splits"]) == (
            ["train", "validation"] if spelling == "parquet" else ["validation"]
        )


def test_the_source_pickles_small_to_workers(spelled):
    source = open_dataset(spelled["parquet"])
    image_bytes = sum(f.stat().st_size for f, _ in IMAGES)
    assert len(pickle.dumps(source)) < image_bytes / 20  # memory-mapped, not copied
    again = pickle.loads(pickle.dumps(source))
    assert again[7][0].tobytes() == source[7][0].tobytes() and again[7][1] == source[7][1]


def test_class_names_in_another_order_are_matched_by_name(tmp_path, folder_numbers):
    names = CLASSES[::-1]  # ClassLabel index k is the folder class 9 - k
    ds = _dataset(names=names, order={c: len(CLASSES) - 1 - c for c in range(len(CLASSES))})
    ds.save_to_disk(str(tmp_path / "ds"))
    source = open_dataset(str(tmp_path / "ds"))
    assert source.classes == names and source[0][1] == len(CLASSES) - 1
    got, data = _run(source)
    _same(got, folder_numbers)
    assert source.target_map == list(range(len(CLASSES)))[::-1]


def test_class_names_unknown_to_the_model_are_refused(tmp_path):
    names = [*CLASSES[:-1], "submarine"]
    _dataset(names=names).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(VitdiagError) as err:
        _run(str(tmp_path / "ds"))
    msg = str(err.value)
    assert "\n" not in msg and "submarine" in msg and "--labels positional" in msg


def _two_images(tmp_path: Path) -> str:
    ds = _dataset(count=4)
    thumbs = [{"bytes": IMAGES[-1][0].read_bytes(), "path": None}] * 4
    ds = ds.add_column("thumb", thumbs, feature=datasets.Image())
    ds = ds.add_column("note", ["a", "b", "c", "d"])
    ds = ds.add_column("index", [3, 2, 1, 0])
    ds.save_to_disk(str(tmp_path / "two"))
    return str(tmp_path / "two")


def _one_line(text: str, *needles: str, **options) -> str:
    with pytest.raises(VitdiagError) as err:
        open_dataset(text, **options)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_columns_are_chosen_by_feature_type_or_by_name(tmp_path):
    two = _two_images(tmp_path)
    _one_line(two, "2 Image columns", "image, thumb", "--image-column")
    image = open_dataset(two, image_column="image")
    thumb = open_dataset(two, image_column="thumb")
    assert image[0][0].tobytes() != thumb[0][0].tobytes()
    expected = open_dataset(str(VAL))[len(IMAGES) - 1][0]
    assert thumb[0][0].tobytes() == expected.tobytes()
    assert thumb.label_column == "label" and thumb.classes == CLASSES
    # an integer column is the model's output index, as a WebDataset .cls is
    by_index = open_dataset(two, image_column="image", label_column="index")
    assert by_index.labelled and by_index.classes is None
    assert [by_index[i][1] for i in range(4)] == [3, 2, 1, 0]


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        ({"image_column": "photo"}, ("no column 'photo'", "image (Image)", "note (Value)")),
        ({"image_column": "note"}, ("'note'", "not an Image or binary", "--image-column")),
        (
            {"image_column": "image", "label_column": "lbl"},
            ("no column 'lbl'", "label (ClassLabel)"),
        ),
        ({"image_column": "image", "label_column": "note"}, ("not a ClassLabel or integer",)),
    ],
)
def test_a_missing_or_wrong_typed_column_lists_the_columns(tmp_path, options, needles):
    _one_line(_two_images(tmp_path), *needles, **options)


def test_no_classlabel_column_is_unlabelled(tmp_path):
    ds = _dataset(count=5).remove_columns("label")
    ds.save_to_disk(str(tmp_path / "ds"))
    source = open_dataset(str(tmp_path / "ds"))
    assert not source.labelled and source.classes is None
    assert [source[i][1] for i in range(5)] == [-1] * 5


def test_splits_default_to_validation_then_test_and_unknown_ones_are_listed(tmp_path, spelled):
    assert open_dataset(spelled["parquet"]).split == "validation"
    train = open_dataset(spelled["parquet"], split="train")
    assert train.split == "train" and len(train) == 20
    assert len(open_dataset(spelled["disk"], split="val")) == len(IMAGES)  # val -> validation
    _one_line(spelled["disk"], "no split 'dev2'", "validation, train", split="dev2")
    small = _dataset(count=3)
    datasets.DatasetDict({"train": small, "test": small}).save_to_disk(str(tmp_path / "tt"))
    assert open_dataset(str(tmp_path / "tt")).split == "test"
    datasets.DatasetDict({"a": small, "b": small}).save_to_disk(str(tmp_path / "ab"))
    _one_line(str(tmp_path / "ab"), "no validation or test split", "a, b", "--split")


def test_an_empty_split_is_refused(tmp_path):
    # datasets itself cannot read either back (no shard; "corresponds to no data")
    empty = datasets.Dataset.from_dict({"image": [], "label": []}, features=_features())
    empty.to_parquet(str(tmp_path / "pq" / "validation.parquet"))
    _one_line(str(tmp_path / "pq"), "Split validation", "holds no examples")
    datasets.DatasetDict({"train": _dataset(count=2), "test": empty}).save_to_disk(
        str(tmp_path / "disk")
    )
    _one_line(str(tmp_path / "disk"), "Split test", "holds no examples")
    assert len(open_dataset(str(tmp_path / "disk"), split="train")) == 2


def test_a_corrupt_image_is_skipped_and_counted_or_refused_under_strict(tmp_path):
    _dataset(count=8, corrupt={3}).save_to_disk(str(tmp_path / "bad"))
    batches = list(make_loader(open_dataset(str(tmp_path / "bad")), eval_transform(CFG, 16)))
    assert sum(len(b.targets) for b in batches) == 7
    assert sum(b.n_unreadable for b in batches) == 1
    strict = open_dataset(str(tmp_path / "bad"), strict=True)
    with pytest.raises(UnreadableImageError) as err:
        list(make_loader(strict, eval_transform(CFG, 16)))
    assert "[3]" in str(err.value) and "\n" not in str(err.value)


def test_hub_name_with_a_cache_dir_and_a_name_not_cached(tmp_path):
    _hub_layout(tmp_path / "home" / "hub", _dataset(count=6), "owner/other")
    assert len(open_dataset(f"hfds/owner/other:{tmp_path / 'home'}")) == 6  # HF_HOME-style
    assert len(open_dataset(f"hfds/owner/other:{tmp_path / 'home' / 'hub'}")) == 6
    _one_line("hfds/owner/other", "not in the local Hugging Face hub cache", "hf download")
    _one_line(f"hfds/owner/other:{tmp_path / 'nowhere'}", "does not exist")
    snapshot = _hub_layout(tmp_path / "scripted", _dataset(count=2), "owner/scripted")
    for f in (snapshot / "data").iterdir():
        f.unlink()
    (snapshot / "scripted.py").write_text("# a loading script, which vitdiag never runs\n")
    _one_line(f"hfds/owner/scripted:{tmp_path / 'scripted'}", "no Parquet files", "save_to_disk")


def test_without_the_datasets_package_hf_sources_say_what_to_install(monkeypatch, spelled):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a)
    )
    for text in (spelled["hub"], spelled["disk"], spelled["parquet"]):
        _one_line(text, "'datasets' package", "vitdiag[hf]")


def test_opening_touches_no_network_even_when_not_told_offline(spelled, tmp_path, monkeypatch):
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise ConnectionRefusedError("blocked by the test's network guard")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for setting in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(setting)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "fresh"))  # the Parquet builder runs
    for text in spelled.values():
        assert len(open_dataset(text)) == len(IMAGES)
    assert attempts == []
    assert (tmp_path / "fresh").is_dir()  # the Arrow copy went to HF_DATASETS_CACHE


def test_worker_processes_read_what_the_main_process_reads(spelled):
    def read(workers: int):
        source = open_dataset(spelled["hub"])
        loader = make_loader(
            source, eval_transform(CFG, 16), batch_size=8, workers=workers, limit=24
        )
        batches = list(loader)
        return [b.images for b in batches], [b.targets.tolist() for b in batches]

    (one, t_one), (two, t_two) = read(0), read(2)
    assert t_one == t_two and all(a.equal(b) for a, b in zip(one, two, strict=True))


def test_cli_evaluates_a_saved_dataset_dict(spelled, folder_numbers):
    # In-process: a subprocess would spend its 15 s importing torch and timm again.
    args = ["eval", str(MODEL), "--data", spelled["disk"], "--split", "validation"]
    done = CliRunner().invoke(app, [*args, "--json", "-", "--device", "cpu", "-q"])
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout)
    assert doc["data"]["kind"] == "hf" and doc["data"]["split"] == "validation"
    metrics = doc["results"][0]["metrics"]
    assert metrics["n_images"] == len(IMAGES)
    assert metrics["top1"] == folder_numbers["eval"]["top1"]


@pytest.mark.parametrize("option", ["image_column", "label_column"])
def test_column_options_on_a_folder_are_refused_not_ignored(option):
    with pytest.raises(VitdiagError) as err:
        open_dataset(str(VAL), **{option: "label"})
    text = str(err.value)
    assert "\n" not in text and "Hugging Face datasets only" in text
    assert f"--{option.replace('_', '-')}" in text
