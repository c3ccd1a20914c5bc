"""The CLI end to end on small real checkpoints: JSON documents, provenance, plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from vitdiag.cli import app
from vitdiag.model import load, sha256_file

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_help_does_not_import_torch():
    code = "import sys; from vitdiag.cli import app; sys.argv=['vitdiag','--help']\n"
    code += "try:\n    app()\nexcept SystemExit:\n    pass\n"
    code += "print('TORCH' if 'torch' in sys.modules else 'CLEAN')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("CLEAN")


def test_info_json_carries_provenance(tiny_ckpt, tmp_path):
    out = tmp_path / "info.json"
    _ok(["info", str(tiny_ckpt), "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1
    assert doc["model"]["arch"] == "vit_tiny_patch16_224"
    assert doc["model"]["sha256"] == sha256_file(tiny_ckpt / "model.safetensors")
    assert "config.json" in doc["model"]["decided_by"]


def test_eval_json_matches_a_direct_forward(tiny_ckpt, image_folder, tmp_path):
    from vitdiag.data import eval_transform, open_dataset

    out = tmp_path / "eval.json"
    _ok(["eval", str(tiny_ckpt), "--data", str(image_folder), "--json", str(out), "-q"])
    doc = json.loads(out.read_text())
    metrics = doc["results"][0]["metrics"]
    assert doc["data"]["n_images"] == 12 and doc["data"]["kind"] == "imagefolder"

    loaded = load(tiny_ckpt)
    source = open_dataset(image_folder)
    tf = eval_transform(loaded.data_config, 32)
    images = torch.stack([tf(source[i][0]) for i in range(len(source))])
    targets = torch.tensor([source[i][1] for i in range(len(source))])
    with torch.no_grad():
        logits = loaded.model(images).double()
    top1 = (logits.argmax(1) == targets).double().mean().item()
    nll = torch.nn.functional.cross_entropy(logits, targets).item()
    assert metrics["top1"] == pytest.approx(top1, abs=1e-12)
    assert metrics["nll"] == pytest.approx(nll, rel=1e-6)


def test_eval_json_to_stdout_is_clean_json(tiny_ckpt):
    result = _ok(["eval", str(tiny_ckpt), "--data", "synthetic:6", "--json", "-", "-q"])
    doc = json.loads(result.stdout)
    assert doc["data"]["synthetic"] is True
    assert "top1" not in doc["results"][0]["metrics"]  # synthetic data has no labels


def test_similarity_compares_two_checkpoints_in_one_plot(tmp_path, image_folder):
    from conftest import save_tiny_vit

    a = save_tiny_vit(tmp_path / "a", seed=1)
    b = save_tiny_vit(tmp_path / "b", seed=2)
    png, out = tmp_path / "cmp.png", tmp_path / "sim.json"
    _ok(
        [
            "similarity",
            str(a),
            str(b),
            "--data",
            str(image_folder),
            "--plot",
            str(png),
            "--json",
            str(out),
            "-q",
        ]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(out.read_text())
    probes = [r["probe"] for r in doc["results"]]
    assert probes == ["similarity", "similarity", "similarity.compare"]
    for r in doc["results"][:2]:
        assert r["extra"]["layers"] == ["embed", "block1", "block2", "norm"]
        assert all(0.0 <= v <= 1.0 for v in r["extra"]["mean"])
    assert doc["results"][0]["metrics"] != doc["results"][1]["metrics"]


def test_collapse_without_data_gives_classifier_geometry(tiny_ckpt, tmp_path):
    out = tmp_path / "c.json"
    _ok(["collapse", str(tiny_ckpt), "--json", str(out)])
    doc = json.loads(out.read_text())
    assert [r["probe"] for r in doc["results"]] == ["classifier"]
    w = load(tiny_ckpt).model.head.weight.detach().double()
    norms = w.norm(dim=1)
    cov = (norms.std() / norms.mean()).item()
    assert doc["results"][0]["metrics"]["w_norm_cov"] == pytest.approx(cov, rel=1e-9)


def test_collapse_with_train_and_val(tiny_ckpt, image_folder, tmp_path):
    out, plots = tmp_path / "c.json", tmp_path / "plots"
    _ok(
        [
            "collapse",
            str(tiny_ckpt),
            "--data",
            str(image_folder),
            "--val",
            str(image_folder),
            "--per-class",
            "3",
            "--plots",
            str(plots),
            "--json",
            str(out),
            "-q",
        ]
    )
    doc = json.loads(out.read_text())
    by = {r["probe"]: r["metrics"] for r in doc["results"]}
    assert by["collapse"]["n"] == 9  # 3 classes x 3 images
    assert 0.0 <= by["calibration"]["ece"] <= 1.0
    assert (plots / "reliability.png").exists()


@pytest.mark.parametrize("variant", ["vit_nomix", "vit_mixup", "vit_cutmix"])
def test_eval_reproduces_the_fixture_scripts_accuracy(variant, tmp_path):
    from conftest import FIXTURES

    manifest = json.loads((FIXTURES / "manifest.json").read_text())["models"][variant]
    out = tmp_path / "eval.json"
    _ok(
        [
            "eval",
            str(FIXTURES / "models" / variant),
            "--data",
            str(FIXTURES / "data" / "val"),
            "--json",
            str(out),
            "-q",
        ]
    )
    metrics = json.loads(out.read_text())["results"][0]["metrics"]
    assert metrics["n_labelled"] == manifest["n_val"]
    assert metrics["top1"] == pytest.approx(manifest["val_top1"], abs=1e-12)
    assert metrics["nll"] == pytest.approx(manifest["val_nll"], rel=1e-4)


def test_similarity_random_baseline_is_the_same_architecture_untrained(tmp_path):
    from conftest import FIXTURES

    out = tmp_path / "s.json"
    _ok(
        [
            "similarity",
            str(FIXTURES / "models" / "vit_nomix"),
            "--random-baseline",
            "--data",
            "synthetic:4",
            "--json",
            str(out),
            "-q",
        ]
    )
    doc = json.loads(out.read_text())
    trained, random_ = doc["results"][0], doc["results"][1]
    assert random_["extra"]["label"] == "vit_tiny_patch16_224 (random)"
    assert random_["extra"]["model"]["arch"] == trained["extra"]["model"]["arch"]
    assert random_["extra"]["layers"] == trained["extra"]["layers"]
    assert random_["extra"]["mean"] != trained["extra"]["mean"]
