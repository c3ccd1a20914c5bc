"""Every checkpoint source through `vitdiag.load` and the CLI, with output parity.

Tiny random models are built with the source library itself (transformers, open_clip), saved
the way that library saves them, loaded by vitdiag, and compared with the source library's own
forward. Hub names load from a Hugging Face cache laid out in a temporary folder with
HF_HUB_OFFLINE=1: no test here touches the network.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import HF_TINY, perturb
from typer.testing import CliRunner

import vitdiag
from vitdiag.cli import app

transformers = pytest.importorskip("transformers")

REV = "0123456789abcdef0123456789abcdef01234567"


def _images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _close(ref: torch.Tensor, got: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _hf_vit(num_labels: int = 10):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(**HF_TINY, num_labels=num_labels)
    return perturb(transformers.ViTForImageClassification(cfg))


def _forward(loaded, x):
    with torch.no_grad():
        return loaded.model(x)


def test_transformers_vit_folder_loads_with_logit_parity(tmp_path):
    hf = _hf_vit()
    hf.save_pretrained(tmp_path / "vit")
    loaded = vitdiag.load(tmp_path / "vit")
    x = _images()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, _forward(loaded, x))
    assert loaded.provenance["source_kind"] == "transformers:vit"
    assert loaded.native_size == (32, 32) and loaded.num_classes == 10
    eps = next(a for a in loaded.assumptions if a.name == "layer_norm_eps")
    assert eps.value == "1e-12" and "transformers:vit" in eps.source


def test_transformers_deit_with_teacher_folder_loads_with_logit_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.DeiTConfig(**HF_TINY, num_labels=7)
    hf = perturb(transformers.DeiTForImageClassificationWithTeacher(cfg))
    hf.save_pretrained(tmp_path / "deit")
    loaded = vitdiag.load(tmp_path / "deit")
    x = _images()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, _forward(loaded, x))


def test_transformers_dinov2_folder_loads_with_token_parity(tmp_path):
    torch.manual_seed(0)
    base = {k: v for k, v in HF_TINY.items() if k != "intermediate_size"}
    hf = perturb(transformers.Dinov2Model(transformers.Dinov2Config(**base, mlp_ratio=2)))
    hf.save_pretrained(tmp_path / "dinov2")
    loaded = vitdiag.load(tmp_path / "dinov2")
    x = _images()
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        _close(ref, loaded.model.forward_features(x))


def test_transformers_siglip_folder_loads_with_pooled_parity(tmp_path):
    torch.manual_seed(0)
    hf = perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF_TINY)))
    hf.save_pretrained(tmp_path / "siglip")
    loaded = vitdiag.load(tmp_path / "siglip")
    x = _images()
    with torch.no_grad():
        _close(hf(pixel_values=x).pooler_output, _forward(loaded, x))


def test_full_clip_folder_loads_the_vision_tower_with_image_feature_parity(tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = transformers.CLIPConfig(vision_config=HF_TINY, text_config=text, projection_dim=16)
    hf = perturb(transformers.CLIPModel(cfg))
    hf.save_pretrained(tmp_path / "clip")
    loaded = vitdiag.load(tmp_path / "clip")
    x = _images()
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=x)
        _close(getattr(ref, "pooler_output", ref), _forward(loaded, x))


def test_open_clip_state_dict_file_loads_with_embedding_parity(tmp_path):
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    oc = perturb(CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True))
    torch.save(oc.state_dict(), tmp_path / "open_clip.pt")
    loaded = vitdiag.load(tmp_path / "open_clip.pt")
    x = _images()
    with torch.no_grad():
        _close(oc.encode_image(x), _forward(loaded, x))
    act = [a for a in loaded.assumptions if "act_layer=gelu" in a.override]
    assert act, [a.name for a in loaded.assumptions]


def test_info_names_the_source_kind_and_the_conversion(tmp_path):
    _hf_vit().save_pretrained(tmp_path / "vit")
    out = tmp_path / "info.json"
    result = CliRunner().invoke(app, ["info", str(tmp_path / "vit"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    model = json.loads(out.read_text())["model"]
    assert model["source_kind"] == "transformers:vit"
    names = [a["name"] for a in model["assumptions"]]
    assert "source format" in names and "layer_norm_eps" in names


def test_every_probe_runs_on_a_converted_transformers_model(tmp_path):
    _hf_vit().save_pretrained(tmp_path / "vit")
    result = CliRunner().invoke(
        app,
        [
            "report",
            str(tmp_path / "vit"),
            "--data",
            "fixtures/data/val",
            "--sizes",
            "48",
            "--limit",
            "20",
            "--batch-size",
            "10",
            "--aug",
            "cutmix,erasing-const",
            "--views",
            "2",
            "--pairs",
            "2",
            "--out",
            str(tmp_path / "report"),
            "--no-plots",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    ran = {r["probe"] for r in doc["results"]}
    assert ran == {
        "classifier",
        "eval",
        "calibration",
        "variance",
        "collapse",
        "mixup_geometry",
        "similarity",
        "invariance",
    }, doc["checkpoints"][0]["skipped"]


def test_fix_posembed_on_a_converted_model_writes_a_plain_timm_checkpoint(tmp_path):
    _hf_vit().save_pretrained(tmp_path / "vit")
    out = tmp_path / "vit_48"
    result = CliRunner().invoke(
        app,
        ["fix-posembed", str(tmp_path / "vit"), "--size", "48", "--rescale", "none"]
        + ["--out", str(out), "--quiet", "--json", str(tmp_path / "fix.json")],
    )
    assert result.exit_code == 0, result.output
    notes = json.loads((tmp_path / "fix.json").read_text())["results"][0]["notes"]
    # transformers ViT's LayerNorm eps 1e-12 has no place in timm's config.json: said, measured.
    assert any("norm_layer=" in n and "eps=1e-12" in n for n in notes), notes
    code = (
        "import sys, timm, torch\n"
        f"m = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
        "y = m(torch.randn(2, 3, 48, 48))\n"
        "assert torch.isfinite(y).all() and y.shape == (2, 10), y.shape\n"
        "assert not any(k.startswith('vitdiag') for k in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------- hub


def _cache_repo(cache, repo: str, files: dict[str, bytes]) -> None:
    """One repo in the Hugging Face cache layout: blobs behind snapshots/<rev>, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)


def _saved_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_name_of_a_timm_repo_loads_from_the_cache(offline_cache, tmp_path):
    _cache_repo(offline_cache, "timm/vit_nomix_copy", _saved_files(_fixture("vit_nomix")))
    loaded = vitdiag.load("hf-hub:timm/vit_nomix_copy")
    local = vitdiag.load(_fixture("vit_nomix"))
    x = _images()
    assert torch.equal(_forward(loaded, x), _forward(local, x))
    assert loaded.provenance["hub"]["repo_id"] == "timm/vit_nomix_copy"
    assert loaded.provenance["hub"]["revision"] == REV


def test_hub_name_of_a_transformers_repo_loads_with_parity(offline_cache, tmp_path):
    hf = _hf_vit()
    hf.save_pretrained(tmp_path / "vit")
    _cache_repo(offline_cache, "google/vit-tiny-test", _saved_files(tmp_path / "vit"))
    loaded = vitdiag.load(f"hf-hub:google/vit-tiny-test@{REV}")
    x = _images()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, _forward(loaded, x))


def test_uncached_hub_name_offline_is_one_clear_line(offline_cache):
    result = CliRunner().invoke(app, ["info", "hf-hub:timm/not_cached_here"])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert "\n" not in err and "timm/not_cached_here" in err and "HF_HUB_OFFLINE" in err


def _fixture(name: str):
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "fixtures" / "models" / name


def test_pretrained_tag_loads_its_hub_copy_from_the_cache(offline_cache, tmp_path):
    from conftest import save_tiny_vit

    # A tiny stand-in under the tag's real hub repo (the real weights are ~40 MB); its head has
    # the tag's 21843 classes so that config and weights agree as in the real repo.
    folder = save_tiny_vit(tmp_path / "tag", num_classes=21843)
    _cache_repo(offline_cache, "timm/vit_tiny_patch16_224.augreg_in21k", _saved_files(folder))
    loaded = vitdiag.load("vit_tiny_patch16_224.augreg_in21k")
    assert loaded.arch == "vit_tiny_patch16_224" and loaded.num_classes == 21843
    assert loaded.provenance["hub"]["repo_id"] == "timm/vit_tiny_patch16_224.augreg_in21k"
    assert loaded.provenance["path"] == "vit_tiny_patch16_224.augreg_in21k"
