"""transformers BEiT and Swin checkpoints give the same outputs in timm `beit_*` / `swin_*`.

Tiny random models are built with transformers, every parameter is moved off its init (so a
dropped, swapped or mis-shifted tensor changes the output), saved with save_pretrained, converted
by vitdiag.loading.convert and compared with transformers' own forward in eval mode.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb

import vitdiag
from vitdiag.errors import VitdiagError
from vitdiag.loading.convert import Converted, convert, detect

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

RTOL, ATOL = 1e-5, 1e-5

BEIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
# grid 8 at 32 px: stage 0 has shifted windows, stage 1 (grid 4 = window) runs unshifted
SWIN = dict(
    image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4
)


def _image(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _close(ref: torch.Tensor, got: torch.Tensor, what: str) -> None:
    err = (ref - got).abs().max().item()
    print(f"{what}: max abs {err:.2e} max rel {err / ref.abs().max().item():.2e}")
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


def _saved(model, tmp_path, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    sd = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert detect(config, sd.keys()) == kind
    return config, sd


def _timm(conv: Converted) -> torch.nn.Module:
    model = timm.create_model(conv.arch, pretrained=False, **conv.model_args)
    model.load_state_dict(conv.state_dict, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------- BEiT


@pytest.mark.parametrize("shared", [False, True], ids=["per_layer", "per_layer_and_shared"])
def test_beit_classifier_logits_match(tmp_path, shared):
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(
        **BEIT,
        num_labels=5,
        use_absolute_position_embeddings=True,
        use_relative_position_bias=True,
        use_shared_relative_position_bias=shared,
        use_mean_pooling=True,
    )
    hf = perturb(transformers.BeitForImageClassification(cfg))
    config, sd = _saved(hf, tmp_path, "transformers:beit")
    conv = convert("transformers:beit", config, sd)
    args = conv.model_args
    assert conv.arch.startswith("beit_") and timm.is_model(conv.arch)
    assert args["global_pool"] == "avg" and args["use_fc_norm"] is True
    assert args["use_rel_pos_bias"] is True and args["use_shared_rel_pos_bias"] is shared
    assert args["init_values"] and args["norm_layer"].keywords["eps"] == 1e-12
    assert "blocks.1.attn.q_bias" in conv.state_dict and "fc_norm.weight" in conv.state_dict
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, _timm(conv)(x), f"beit logits shared={shared}")


def test_beit_model_class_token_shared_bias_no_layer_scale(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(
        **BEIT,
        use_shared_relative_position_bias=True,
        use_mean_pooling=False,
        layer_scale_init_value=0.0,
        use_mask_token=True,
    )
    hf = perturb(transformers.BeitModel(cfg))
    config, sd = _saved(hf, tmp_path, "transformers:beit")
    conv = convert("transformers:beit", config, sd)
    args = conv.model_args
    assert args["num_classes"] == 0 and args["global_pool"] == "token"
    assert not args["init_values"] and args["use_abs_pos_emb"] is False
    assert args["use_rel_pos_bias"] is False and args["use_shared_rel_pos_bias"] is True
    assert any(a.what == "mask_token" for a in conv.assumptions)
    model = _timm(conv)
    x = _image()
    with torch.no_grad():
        out = hf(pixel_values=x)
        _close(out.last_hidden_state, model.forward_features(x), "beit tokens")
        _close(out.pooler_output, model(x), "beit class token")


def test_beit_in_memory_names_convert_too(tmp_path):
    # transformers 5 renames layers in memory (layers.N.attention.q_proj, shared_position_bias)
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(
        **BEIT,
        num_labels=3,
        use_relative_position_bias=True,
        use_shared_relative_position_bias=True,
    )
    hf = perturb(transformers.BeitForImageClassification(cfg))
    config, _ = _saved(hf, tmp_path, "transformers:beit")
    sd = hf.state_dict()
    assert "beit.layers.0.attention.q_proj.weight" in sd
    conv = convert("transformers:beit", config, sd)
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, _timm(conv)(x), "beit in-memory names")


def test_beit_without_pooler_norm_is_one_clear_error(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BeitModel(transformers.BeitConfig(**BEIT), add_pooling_layer=False)
    config, sd = _saved(hf, tmp_path, "transformers:beit")
    with pytest.raises(VitdiagError, match="pooler LayerNorm"):
        convert("transformers:beit", config, sd)


# --------------------------------------------------------------------------------------- Swin


def test_swin_classifier_logits_match(tmp_path):
    torch.manual_seed(0)
    hf = perturb(
        transformers.SwinForImageClassification(transformers.SwinConfig(**SWIN, num_labels=6))
    )
    config, sd = _saved(hf, tmp_path, "transformers:swin")
    conv = convert("transformers:swin", config, sd)
    args = conv.model_args
    assert conv.arch.startswith("swin_") and timm.is_model(conv.arch)
    assert args["depths"] == (2, 2) and args["num_heads"] == (2, 4) and args["window_size"] == 4
    assert args["num_classes"] == 6 and "norm_layer" not in args  # eps 1e-5 is timm's own
    # merging moves from the end of stage 0 (transformers) to the start of stage 1 (timm)
    assert "layers.1.downsample.reduction.weight" in conv.state_dict
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, _timm(conv)(x), "swin logits")


def test_swin_model_tokens_and_pooled_match_with_shifts_in_every_stage(tmp_path):
    # 64 px, patch 4: grids 16 and 8, both larger than the window, so both stages shift
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(**dict(SWIN, image_size=64, embed_dim=24, num_heads=[3, 6]))
    hf = perturb(transformers.SwinModel(cfg))
    config, sd = _saved(hf, tmp_path, "transformers:swin")
    conv = convert("transformers:swin", config, sd)
    assert conv.model_args["num_classes"] == 0
    model = _timm(conv)
    x = _image(64)
    with torch.no_grad():
        out = hf(pixel_values=x)
        tokens = model.forward_features(x)
        _close(out.last_hidden_state, tokens.flatten(1, 2), "swin tokens")
        _close(out.pooler_output, model(x), "swin pooled")


def test_swin_in_memory_names_convert_too(tmp_path):
    torch.manual_seed(0)
    hf = perturb(
        transformers.SwinForImageClassification(transformers.SwinConfig(**SWIN, num_labels=2))
    )
    config, _ = _saved(hf, tmp_path, "transformers:swin")
    sd = hf.state_dict()
    assert any(".attention.q_proj." in k for k in sd)
    conv = convert("transformers:swin", config, sd)
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, _timm(conv)(x), "swin in-memory names")


def test_swin_other_eps_is_carried_and_stated():
    config = dict(SWIN, model_type="swin", layer_norm_eps=1e-6)
    hf = transformers.SwinModel(transformers.SwinConfig(**SWIN, layer_norm_eps=1e-6))
    conv = convert("transformers:swin", config, hf.state_dict())
    assert conv.model_args["norm_layer"].keywords["eps"] == 1e-6
    assert any(a.what.startswith("patch-embedding and merging") for a in conv.assumptions)


def test_swin_absolute_embedding_is_one_clear_error():
    hf = transformers.SwinModel(transformers.SwinConfig(**SWIN, use_absolute_embeddings=True))
    config = dict(SWIN, model_type="swin", use_absolute_embeddings=True)
    with pytest.raises(VitdiagError, match="absolute position embedding"):
        convert("transformers:swin", config, hf.state_dict())


# --------------------------------------------------------------------------------------- loader


def test_detect_knows_beit_and_swin():
    assert detect({"model_type": "beit"}, []) == "transformers:beit"
    assert detect({"model_type": "swin"}, []) == "transformers:swin"


def test_swin_folder_loads_through_vitdiag_load_with_logit_parity(tmp_path):
    torch.manual_seed(0)
    hf = perturb(
        transformers.SwinForImageClassification(transformers.SwinConfig(**SWIN, num_labels=4))
    )
    hf.save_pretrained(tmp_path / "swin")
    loaded = vitdiag.load(tmp_path / "swin")
    assert loaded.provenance["source_kind"] == "transformers:swin"
    assert loaded.native_size == (32, 32) and loaded.num_classes == 4
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, loaded.model(x), "swin through load()")


def test_beit_folder_loads_through_vitdiag_load_with_logit_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(**BEIT, num_labels=3, use_relative_position_bias=True)
    hf = perturb(transformers.BeitForImageClassification(cfg))
    hf.save_pretrained(tmp_path / "beit")
    loaded = vitdiag.load(tmp_path / "beit")
    assert loaded.provenance["source_kind"] == "transformers:beit"
    eps = next(a for a in loaded.assumptions if a.name == "layer_norm_eps")
    assert eps.value == "1e-12"
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, loaded.model(x), "beit through load()")
