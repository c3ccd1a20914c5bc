"""Labels are the ground truth of every metric: each image must reach its true output index
whatever the folders look like (order, a missing class, names), or the run is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.data.readers.reader_image_folder import find_images_and_targets
from typer.testing import CliRunner

from vitdiag.cli import app
from vitdiag.data import class_indices, open_dataset
from vitdiag.errors import VitdiagError

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT / "fixtures" / "data" / "val"
MODEL = ROOT / "fixtures" / "models" / "vit_nomix"
CLASSES = sorted(p.name for p in VAL.iterdir())
runner = CliRunner()


def _folder(dst: Path, classes: dict[str, list[Path]]) -> Path:
    """An ImageFolder at `dst`: folder name -> the images copied into it."""
    for name, images in classes.items():
        (dst / name).mkdir(parents=True)
        for img in images:
            shutil.copy(img, dst / name / img.name)
    return dst


def _images(cls: str) -> list[Path]:
    return sorted((VAL / cls).glob("*.jpg"))


def _model_copy(dst: Path, perm: list[int] | None = None, names: bool = True) -> Path:
    """The fixture model with its outputs permuted (output j is the old output perm[j], and
    label_names follow), or without class names."""
    shutil.copytree(MODEL, dst)
    config = json.loads((dst / "config.json").read_text())
    if perm is not None:
        state = load_file(str(dst / "model.safetensors"))
        for key in ("head.weight", "head.bias"):
            state[key] = state[key][torch.tensor(perm)].contiguous()
        save_file(state, str(dst / "model.safetensors"))
        config["label_names"] = [config["label_names"][i] for i in perm]
    if not names:
        config.pop("label_names")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _eval(tmp_path: Path, model: Path, *args: str) -> dict:
    out = tmp_path / f"eval{len(list(tmp_path.glob('eval*.json')))}.json"
    done = runner.invoke(
        app, ["eval", str(model), *args, "--json", str(out), "-q", "--device", "cpu"]
    )
    assert done.exit_code == 0, done.output
    return json.loads(out.read_text())


def _top1(doc: dict) -> float:
    return next(r for r in doc["results"] if r["probe"] == "eval")["metrics"]["top1"]


def _report_eval(tmp_path: Path, model: Path, data: Path, val: Path, *args: str) -> dict:
    out = tmp_path / "r.json"
    done = runner.invoke(
        app,
        ["report", str(model), "--data", str(data), "--val", str(val), "--probes", "eval"]
        + ["--out", str(tmp_path / "rep"), "--force", "--no-plots", "--json", str(out), "-q"]
        + ["--device", "cpu", "--reference-images", "0", *args],
    )
    assert done.exit_code == 0, done.output
    return json.loads(out.read_text())


def _assert_one_line_error(done, *needles: str) -> None:
    assert done.exit_code == 2, (done.exit_code, done.output)
    err = done.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


# -- folder order -------------------------------------------------------------------------------


def test_class_folders_follow_timms_imagefolder_order(tmp_path):
    # natural order: class1 < Class2 < class10; plain sorted: Class2 < class1 < class10
    names = ["class10", "Class2", "class1", "b3", "b20"]
    img = _images(CLASSES[0])[0]
    root = _folder(tmp_path / "d", {n: [img] for n in names})
    source = open_dataset(str(root))
    samples, class_to_idx = find_images_and_targets(str(root))
    assert source.classes == sorted(class_to_idx, key=class_to_idx.get)
    assert source.classes != sorted(names)
    got = {str(root / f): t for f, t in zip(source.files, source.targets, strict=True)}
    assert got == dict(samples)


# -- by name ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def permuted(tmp_path_factory) -> Path:
    """The fixture model with its outputs in another order than the folders sort."""
    perm = [3, 7, 0, 9, 1, 5, 2, 8, 6, 4]
    return _model_copy(tmp_path_factory.mktemp("m") / "permuted", perm)


def test_names_match_whatever_the_output_order_and_positional_says_so(tmp_path, permuted):
    by_name = _eval(tmp_path, permuted, "--data", str(VAL))
    assert _top1(by_name) == 0.995  # the fixture's number, as with the unpermuted model
    assert by_name["data"]["labels"] == "matched by name (10 of the model's 10 classes)"
    positional = _eval(tmp_path, permuted, "--data", str(VAL), "--labels", "positional")
    assert _top1(positional) < 0.5
    assert positional["data"]["labels"].startswith("positional (folder order = output order")
    notes = positional["results"][0]["notes"]
    assert any(n.startswith("labels: positional") for n in notes), notes


def test_a_folder_lacking_classes_keeps_each_images_true_index(tmp_path):
    # A: 9 classes (no astronaut; 170 images) and half the camera images;
    # B: astronaut and the other half.
    # Disjoint, together the full folder: the correct counts must add up to the full one's.
    cam = _images("camera")
    a = {c: _images(c) for c in CLASSES if c not in ("astronaut", "camera")}
    a = _folder(tmp_path / "a", {**a, "camera": cam[:10]})
    b = _folder(tmp_path / "b", {"astronaut": _images("astronaut"), "camera": cam[10:]})
    full = _top1(_eval(tmp_path, MODEL, "--data", str(VAL))) * 200
    got = [_eval(tmp_path, MODEL, "--data", str(d)) for d in (a, b)]
    correct = sum(_top1(d) * d["data"]["n_images"] for d in got)
    assert round(correct) == round(full) == 199
    assert got[0]["data"]["labels"] == "matched by name (9 of the model's 10 classes)"


def test_without_names_a_val_lacking_a_class_is_numbered_by_the_data(tmp_path):
    nameless = _model_copy(tmp_path / "nameless", names=False)
    val = _folder(tmp_path / "val", {c: _images(c) for c in CLASSES if c != "astronaut"})
    with_names = _top1(_report_eval(tmp_path, MODEL, VAL, val))
    doc = _report_eval(tmp_path, nameless, VAL, val)
    assert _top1(doc) == with_names > 0.9  # without --data's list, every index shifts by one
    assert doc["data"]["val"]["labels"].startswith("positional (--data's folder order")
    # a --val class that --data lacks cannot be numbered: refused
    extra = _folder(
        tmp_path / "val2", {"astronaut": _images("astronaut"), "zebra": _images("camera")}
    )
    done = runner.invoke(
        app,
        ["report", str(nameless), "--data", str(VAL), "--val", str(extra), "--probes", "eval"]
        + ["--out", str(tmp_path / "rep2"), "--no-plots", "-q", "--device", "cpu"],
    )
    _assert_one_line_error(done, "zebra", "--data")


def test_a_partial_match_is_refused_unless_positional(tmp_path):
    renamed = {("spaceman" if c == "astronaut" else c): _images(c) for c in CLASSES}
    data = _folder(tmp_path / "d", renamed)
    done = runner.invoke(app, ["eval", str(MODEL), "--data", str(data), "-q", "--device", "cpu"])
    _assert_one_line_error(done, "spaceman", "--labels positional", "1 of the 10")
    doc = _eval(tmp_path, MODEL, "--data", str(data), "--labels", "positional")
    # spaceman sorts last, so the nine classes after astronaut shift down by one
    assert _top1(doc) < 0.5
    assert doc["data"]["labels"] == "positional (folder order = output order)"
    done = runner.invoke(
        app, ["eval", str(MODEL), "--data", str(data), "--labels", "by-name", "-q"]
    )
    _assert_one_line_error(done, "--labels must be auto, name or positional")


def test_the_rule_is_one_line_in_report_md_and_json(tmp_path):
    doc = _report_eval(tmp_path, MODEL, VAL, VAL)
    line = "labels: matched by name (10 of the model's 10 classes)"
    assert line in (tmp_path / "rep" / "report.md").read_text()
    assert [d["labels"] for d in doc["data"].values()] == [line.removeprefix("labels: ")]
    assert line in next(r for r in doc["results"] if r["probe"] == "eval")["notes"]


def test_more_data_classes_than_outputs_is_refused(tmp_path):
    data = _folder(tmp_path / "d", {**{c: _images(c) for c in CLASSES}, "zebra": _images("coins")})
    for extra in ([], ["--labels", "positional"]):
        done = runner.invoke(
            app, ["eval", str(MODEL), "--data", str(data), "-q", "--device", "cpu", *extra]
        )
        _assert_one_line_error(done, "11 classes but the model has 10 outputs")


def test_class_indices_rules():
    assert class_indices(["b", "a"], ["a", "b"]).index == [1, 0]
    assert class_indices(["b", "a"], ["a", "b"], "positional").index == [0, 1]
    # different vocabularies (synset folders, readable names): positional, and it says why
    found = class_indices(["n01", "n02"], ["tench", "goldfish"])
    assert found.index == [0, 1] and "none of the 2 folder names" in found.rule
    with pytest.raises(VitdiagError, match="has none"):
        class_indices(["a", "b"], None, "name")
    with pytest.raises(VitdiagError, match="n01"):
        class_indices(["n01", "n02"], ["tench", "goldfish"], "name")
    assert class_indices(["b", "c"], None, reference=["a", "b", "c"]).index == [1, 2]
