"""Checkpoints from transformers, open_clip and original DINOv2 give the same outputs in timm.

Each test builds a tiny random model with the source library, saves it the way that library does,
converts the saved files with vitdiag.loading.convert and compares the forward passes in eval mode.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import HF_TINY, perturb

from vitdiag.errors import VitdiagError
from vitdiag.loading.convert import Converted, convert, detect

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

RTOL, ATOL = 1e-5, 1e-5


def _save_hf(model, tmp_path) -> tuple[dict, dict[str, torch.Tensor]]:
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    return config, safetensors_torch.load_file(str(tmp_path / "model.safetensors"))


def _timm(conv: Converted) -> torch.nn.Module:
    model = timm.create_model(conv.arch, pretrained=False, **conv.model_args)
    model.load_state_dict(conv.state_dict, strict=True)
    return model.eval()


def _image(size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _close(ref: torch.Tensor, got: torch.Tensor, what: str) -> None:
    err = (ref - got).abs().max().item()
    rel = err / ref.abs().max().item()
    print(f"{what}: max abs {err:.2e} max rel {rel:.2e}")
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


def _convert_saved(model, tmp_path, expect_kind: str) -> tuple[Converted, torch.nn.Module]:
    config, sd = _save_hf(model, tmp_path)
    kind = detect(config, sd.keys())
    assert kind == expect_kind
    conv = convert(kind, config, sd)
    return conv, _timm(conv)


# --------------------------------------------------------------------------------- transformers


def test_vit_with_head_logits_match(tmp_path):
    torch.manual_seed(0)
    hf = perturb(
        transformers.ViTForImageClassification(transformers.ViTConfig(**HF_TINY, num_labels=5))
    )
    conv, model = _convert_saved(hf, tmp_path, "transformers:vit")
    assert conv.arch.startswith("vit_") and timm.is_model(conv.arch)
    assert conv.model_args["num_classes"] == 5
    assert conv.model_args["norm_layer"].keywords["eps"] == 1e-12
    assert any(
        str(a) == "LayerNorm eps 1e-12 (from config layer_norm_eps)" for a in conv.assumptions
    )
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, model(x), "vit logits")


def test_vit_without_head_tokens_match_and_pooler_is_reported(tmp_path):
    torch.manual_seed(0)
    hf = perturb(transformers.ViTModel(transformers.ViTConfig(**HF_TINY)))
    conv, model = _convert_saved(hf, tmp_path, "transformers:vit")
    assert conv.model_args["num_classes"] == 0
    assert any(a.what == "pooler" for a in conv.assumptions)
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).last_hidden_state, model.forward_features(x), "vit tokens")


def test_deit_with_teacher_averages_both_heads(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.DeiTConfig(**HF_TINY, num_labels=7)
    hf = perturb(transformers.DeiTForImageClassificationWithTeacher(cfg))
    conv, model = _convert_saved(hf, tmp_path, "transformers:deit")
    assert "distilled" in conv.arch
    assert "head_dist.weight" in conv.state_dict
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, model(x), "deit teacher logits")


def test_deit_plain_classifier_reads_class_token_only(tmp_path):
    torch.manual_seed(0)
    hf = perturb(
        transformers.DeiTForImageClassification(transformers.DeiTConfig(**HF_TINY, num_labels=4))
    )
    conv, model = _convert_saved(hf, tmp_path, "transformers:deit")
    assert conv.model_args["reg_tokens"] == 1  # the distillation token rides as a register
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).logits, model(x), "deit logits")


def _dinov2_cfg(cls, **kw):
    base = {k: v for k, v in HF_TINY.items() if k != "intermediate_size"}
    return cls(**base, layerscale_value=0.5, **kw)


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_dinov2_tokens_match(tmp_path, swiglu):
    torch.manual_seed(0)
    hf = perturb(
        transformers.Dinov2Model(_dinov2_cfg(transformers.Dinov2Config, use_swiglu_ffn=swiglu))
    )
    conv, model = _convert_saved(hf, tmp_path, "transformers:dinov2")
    assert "dinov2" in conv.arch
    assert conv.model_args["init_values"] is not None
    assert ("mlp_layer" in conv.model_args) == swiglu
    x = _image()
    with torch.no_grad():
        _close(
            hf(pixel_values=x).last_hidden_state,
            model.forward_features(x),
            f"dinov2 swiglu={swiglu}",
        )


def test_dinov2_with_registers_tokens_match(tmp_path):
    torch.manual_seed(0)
    cfg = _dinov2_cfg(transformers.Dinov2WithRegistersConfig, num_register_tokens=3)
    hf = perturb(transformers.Dinov2WithRegistersModel(cfg))
    conv, model = _convert_saved(hf, tmp_path, "transformers:dinov2_with_registers")
    assert conv.model_args["reg_tokens"] == 3 and conv.model_args["no_embed_class"] is True
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).last_hidden_state, model.forward_features(x), "dinov2 registers")


def test_clip_vision_pooled_output_matches(tmp_path):
    torch.manual_seed(0)
    hf = perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_TINY)))
    conv, model = _convert_saved(hf, tmp_path, "transformers:clip")
    assert "clip" in conv.arch and conv.model_args["act_layer"] == "quick_gelu"
    x = _image()
    with torch.no_grad():
        _close(hf(pixel_values=x).pooler_output, model(x), "clip vision pooled")


def test_full_clip_image_features_match(tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = transformers.CLIPConfig(vision_config=HF_TINY, text_config=text, projection_dim=16)
    hf = perturb(transformers.CLIPModel(cfg))
    conv, model = _convert_saved(hf, tmp_path, "transformers:clip")
    assert conv.model_args["num_classes"] == 16
    assert not any(k.startswith("text") for k in conv.state_dict)
    x = _image()
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=x)
        ref = getattr(ref, "pooler_output", ref)
        _close(ref, model(x), "clip image features")


def test_siglip_vision_pooled_and_tokens_match(tmp_path):
    torch.manual_seed(0)
    hf = perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF_TINY)))
    conv, model = _convert_saved(hf, tmp_path, "transformers:siglip")
    assert "siglip" in conv.arch
    assert conv.model_args["act_layer"] == "gelu_tanh" and conv.model_args["global_pool"] == "map"
    x = _image()
    with torch.no_grad():
        out = hf(pixel_values=x)
        _close(out.last_hidden_state, model.forward_features(x), "siglip tokens")
        _close(out.pooler_output, model(x), "siglip pooled")


def test_preprocessor_config_fills_data_config(tmp_path):
    hf = transformers.ViTModel(transformers.ViTConfig(**HF_TINY))
    config, sd = _save_hf(hf, tmp_path)
    pre = {
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.4, 0.5, 0.6],
        "size": {"shortest_edge": 40},
        "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True,
        "resample": 3,
    }
    data = convert("transformers:vit", config, sd, preprocessor=pre).data_config
    assert data["mean"] == (0.1, 0.2, 0.3) and data["std"] == (0.4, 0.5, 0.6)
    assert data["input_size"] == (3, 32, 32) and data["interpolation"] == "bicubic"
    assert data["crop_pct"] == pytest.approx(0.8)


# --------------------------------------------------------------------------------- open_clip


def _open_clip(width: int, head_width: int, quick_gelu: bool):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=2, width=width, head_width=head_width, patch_size=8, image_size=32
    )
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    del open_clip
    torch.manual_seed(0)
    return perturb(
        CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    ), vision


def test_open_clip_state_dict_without_config_assumes_quick_gelu(tmp_path):
    # width 128 / 64 gives the 2 heads the width // 64 rule assumes
    oc, _ = _open_clip(width=128, head_width=64, quick_gelu=True)
    torch.save(oc.state_dict(), tmp_path / "open_clip.pt")
    sd = torch.load(tmp_path / "open_clip.pt", weights_only=True)
    assert detect(None, sd.keys()) == "open_clip"
    conv = convert("open_clip", None, sd)
    assert conv.model_args["act_layer"] == "quick_gelu" and conv.model_args["num_heads"] == 2
    assert any(a.what == "activation" and "act_layer=gelu" in a.override for a in conv.assumptions)
    model = _timm(conv)
    x = _image()
    with torch.no_grad():
        _close(oc.encode_image(x), model(x), "open_clip quick_gelu")


def test_open_clip_config_gives_heads_and_activation(tmp_path):
    oc, vision = _open_clip(width=32, head_width=16, quick_gelu=False)
    sd = oc.state_dict()
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {
                "width": 32,
                "head_width": 16,
                "layers": 2,
                "patch_size": 8,
                "image_size": 32,
            },
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    assert detect(config, sd.keys()) == "open_clip"
    conv = convert("open_clip", config, sd)
    assert conv.model_args["act_layer"] == "gelu" and conv.model_args["num_heads"] == 2
    assert conv.data_config["mean"] == (0.5, 0.5, 0.5)
    model = _timm(conv)
    x = _image()
    with torch.no_grad():
        _close(oc.encode_image(x), model(x), "open_clip gelu from config")


@pytest.mark.parametrize("with_config", [False, True], ids=["shapes", "config"])
def test_open_clip_timm_trunk_matches(tmp_path, with_config):
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        timm_model_name="vit_tiny_patch16_224", timm_pool="avg", timm_proj="linear"
    )
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    torch.manual_seed(0)
    oc = perturb(CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text))
    sd = oc.state_dict()
    assert any(k.startswith("visual.trunk.") for k in sd)
    config = {"model_cfg": {"vision_cfg": {"timm_model_name": "vit_tiny_patch16_224"}}}
    config = config if with_config else None
    assert detect(config, sd.keys()) == "open_clip"
    conv = convert("open_clip", config, sd)
    assert conv.model_args["num_classes"] == 16 and conv.model_args["global_pool"] == "avg"
    assert (conv.arch == "vit_tiny_patch16_224") or not with_config
    model = _timm(conv)
    x = _image(224)
    with torch.no_grad():
        _close(oc.encode_image(x), model(x), f"open_clip timm trunk config={with_config}")


# --------------------------------------------------------------------------------- original DINOv2


def _to_original_dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' saved Dinov2 layout back to facebookresearch/dinov2's names (the inverse of
    transformers' conversion): q/k/v fused into attn.qkv, layer_scale -> ls.gamma."""
    out = {}
    for k, v in sd.items():
        k = k.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
        k = k.replace("embeddings.position_embeddings", "pos_embed")
        k = re.sub(r"^embeddings\.", "", k)
        k = re.sub(r"^encoder\.layer\.(\d+)\.", r"blocks.\1.", k)
        k = re.sub(r"layer_scale(\d)\.lambda1", r"ls\1.gamma", k)
        k = k.replace("attention.output.dense", "attn.proj")
        k = k.replace("mlp.weights_in", "mlp.w12").replace("mlp.weights_out", "mlp.w3")
        k = re.sub(r"^layernorm\.", "norm.", k)
        out[k] = v
    for i in {int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))}:
        for part in ("weight", "bias"):
            qkv = [
                out.pop(f"blocks.{i}.attention.attention.{n}.{part}")
                for n in ("query", "key", "value")
            ]
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(qkv)
    return out


@pytest.mark.parametrize("registers", [0, 4], ids=["plain", "reg4"])
def test_original_dinov2_tokens_match(tmp_path, registers):
    torch.manual_seed(0)
    # hidden 128 -> 2 heads under the width // 64 rule that original checkpoints need
    kw = dict(HF_TINY, hidden_size=128)
    kw.pop("intermediate_size")
    if registers:
        hf = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**kw, num_register_tokens=registers)
        )
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    hf = perturb(hf)
    _, sd = _save_hf(hf, tmp_path)
    orig = _to_original_dinov2(sd)
    assert "mask_token" in orig and "blocks.0.ls1.gamma" in orig
    assert detect(None, orig.keys()) == "dinov2_original"
    conv = convert("dinov2_original", None, orig)
    assert conv.model_args["num_heads"] == 2 and conv.model_args["reg_tokens"] == registers
    assert any(a.what == "num_heads" and a.override for a in conv.assumptions)
    model = _timm(conv)
    x = _image()
    with torch.no_grad():
        _close(
            hf(pixel_values=x).last_hidden_state,
            model.forward_features(x),
            f"dinov2 original r{registers}",
        )


# --------------------------------------------------------------------------------- detection


def test_detect_names_unsupported_model_type_and_supported_ones():
    with pytest.raises(VitdiagError, match="model_type 'mobilevit'.*dinov2_with_registers"):
        detect({"model_type": "mobilevit"}, [])


def test_detect_leaves_timm_checkpoints_alone():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    assert detect({"architecture": "vit_tiny_patch16_224"}, model.state_dict().keys()) is None
    assert detect(None, model.state_dict().keys()) is None


def test_detect_transformers_weights_without_config_asks_for_it():
    with pytest.raises(VitdiagError, match="config.json"):
        detect(None, ["vit.embeddings.patch_embeddings.projection.weight"])


def test_full_clip_and_siglip_configs_are_recognised():
    assert detect({"model_type": "clip", "vision_config": {}}, []) == "transformers:clip"
    assert detect({"model_type": "siglip_vision_model"}, []) == "transformers:siglip"


def test_convert_module_does_not_import_source_libraries():
    import subprocess
    import sys

    code = (
        "import sys, vitdiag.loading.convert; "
        "bad = [m for m in ('transformers', 'open_clip') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
