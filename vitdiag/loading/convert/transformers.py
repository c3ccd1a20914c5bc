"""transformers checkpoints: ViT, DeiT, DINOv2 (with and without registers), CLIP and SigLIP
vision towers, and the preprocessing their preprocessor_config.json records."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.loading.convert.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SIZE_NAMES,
    Assumption,
    Converted,
    apply_timm_filter,
    config_activation,
    config_layer_norm_eps,
    config_value,
    exact_mlp_ratio,
    join_qkv,
    layer_norm_with_eps,
    registered_arch_name,
    rename_key,
    strip_prefix,
)
from vitdiag.loading.convert.dinov2 import dinov2_arch_name, dinov2_model_args

# ---------------------------------------------------------------------------------------------
# ViT / DeiT

_HF_VIT_LAYER_RULES = [
    # both the saved (legacy) spelling and the transformers 5 in-memory spelling
    (r"^(?:encoder\.layer|encoder\.layers|layers)\.(\d+)\.", r"blocks.\1."),
    (r"\.attention\.attention\.query\.", ".attn.q."),
    (r"\.attention\.attention\.key\.", ".attn.k."),
    (r"\.attention\.attention\.value\.", ".attn.v."),
    (r"\.attention\.(q|k|v)_proj\.", r".attn.\1."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layer_scale(1|2)\.lambda1$", r".ls\1.gamma"),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layernorm\.", "norm."),
]


def _hf_bert_style(sd: dict[str, torch.Tensor], model_prefix: str) -> dict[str, torch.Tensor]:
    """Rename a transformers ViT/DeiT/DINOv2 encoder to timm block names, q/k/v fused."""
    sd = strip_prefix(sd, (model_prefix,))
    out = {rename_key(k, _HF_VIT_LAYER_RULES): v for k, v in sd.items()}
    for i in {int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))}:
        join_qkv(out, f"blocks.{i}.attn.", "q", "k", "v", "qkv")
    return out


def convert_hf_vit(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
    family = kind.split(":")[1]
    assumptions: list[Assumption] = []
    sd = _hf_bert_style(sd, f"{family}.")
    for k in [k for k in sd if k.startswith("pooler.")]:
        del sd[k]
        assumptions.append(
            Assumption(
                "pooler", "dropped", f"{k}: timm has no tanh pooler; features are the class token"
            )
        )
    distilled = "distillation_classifier.weight" in sd
    dist_token = sd.pop("embeddings.distillation_token", None)
    if dist_token is not None and distilled:
        sd["dist_token"] = dist_token
        sd["head.weight"], sd["head.bias"] = (
            sd.pop("cls_classifier.weight"),
            sd.pop("cls_classifier.bias"),
        )
        sd["head_dist.weight"] = sd.pop("distillation_classifier.weight")
        sd["head_dist.bias"] = sd.pop("distillation_classifier.bias")
        assumptions.append(
            Assumption(
                "logits",
                "mean of class and distillation heads",
                "DeiT with teacher, as timm's distilled eval",
            )
        )
    elif dist_token is not None:
        # DeiTForImageClassification / DeiTModel read only the class token; the distillation
        # token is one more prefix token with a position, which is what a timm register is.
        sd["reg_token"] = dist_token
    if "classifier.weight" in sd:
        sd["head.weight"], sd["head.bias"] = sd.pop("classifier.weight"), sd.pop("classifier.bias")

    embed_dim = int(config_value(config, "hidden_size", 768, assumptions))
    patch = int(config_value(config, "patch_size", 16, assumptions))
    img = int(config_value(config, "image_size", 224, assumptions))
    heads = int(config_value(config, "num_attention_heads", 12, assumptions))
    assumptions.append(Assumption("num_heads", str(heads), "from config num_attention_heads"))
    model_args = dict(
        img_size=img,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=int(config_value(config, "num_hidden_layers", 12, assumptions)),
        num_heads=heads,
        mlp_ratio=int(config_value(config, "intermediate_size", 3072, assumptions)) / embed_dim,
        qkv_bias=bool(config_value(config, "qkv_bias", True, assumptions)),
        norm_layer=layer_norm_with_eps(config_layer_norm_eps(config, 1e-12, assumptions)),
        act_layer=config_activation(config, "gelu", assumptions),
        class_token=True,
        reg_tokens=1 if "reg_token" in sd else 0,
        no_embed_class=False,
        pre_norm=False,
        final_norm=True,
        fc_norm=False,
        global_pool="token",
        init_values=None,
        num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
    )
    if distilled:
        arch = _deit_distilled_name(embed_dim, patch, img)
    else:
        arch = registered_arch_name("vit", embed_dim, patch, str(img), "vit_base_patch16_224")
    return Converted(arch, model_args, sd, assumptions=assumptions)


def _deit_distilled_name(embed_dim: int, patch: int, img: int) -> str:
    import timm

    size = SIZE_NAMES.get(embed_dim, "base")
    name = f"deit_{size}_distilled_patch{patch}_{img}"
    return name if timm.is_model(name) else "deit_base_distilled_patch16_224"


# ---------------------------------------------------------------------------------------------
# DINOv2 (with and without registers), renamed to the original DINOv2 layout


def convert_hf_dinov2(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
    assumptions: list[Assumption] = []
    sd = _hf_bert_style(sd, "dinov2.")
    for k in [k for k in sd if k.startswith("classifier.")]:
        del sd[k]
        assumptions.append(
            Assumption(
                "classifier", "dropped", f"{k}: timm has no [class, mean patch] head; features only"
            )
        )
    # Rename to the original DINOv2 layout so one path (timm's own filter) does the token algebra.
    rules = [
        (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.register_tokens$", "register_tokens"),
        (r"\.mlp\.weights_in\.", ".mlp.w12."),
        (r"\.mlp\.weights_out\.", ".mlp.w3."),
        (r"\.mlp\.down_proj\.", ".mlp.w3."),
    ]
    sd = {rename_key(k, rules): v for k, v in sd.items()}
    for k in [k for k in sd if ".mlp.gate_proj." in k]:
        # transformers 5 in-memory split of weights_in: gate (SiLU side) first, as in w12
        up = k.replace("gate_proj", "up_proj")
        sd[k.replace("gate_proj", "w12")] = torch.cat([sd.pop(k), sd.pop(up)], dim=0)

    embed_dim = int(config_value(config, "hidden_size", 768, assumptions))
    patch = int(config_value(config, "patch_size", 14, assumptions))
    heads = int(config_value(config, "num_attention_heads", 12, assumptions))
    assumptions.append(Assumption("num_heads", str(heads), "from config num_attention_heads"))
    swiglu = bool(config_value(config, "use_swiglu_ffn", False, assumptions))
    regs = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    model_args = dinov2_model_args(
        sd,
        img=int(config_value(config, "image_size", 518, assumptions)),
        heads=heads,
        eps=config_layer_norm_eps(config, 1e-6, assumptions),
        act="silu" if swiglu else config_activation(config, "gelu", assumptions),
        qkv_bias=bool(config_value(config, "qkv_bias", True, assumptions)),
    )
    if swiglu:
        assumptions.append(
            Assumption("MLP", "SwiGLUPacked (SiLU gate)", "from config use_swiglu_ffn")
        )
    assumptions.append(
        Assumption(
            "position table",
            f"{model_args['img_size']} px",
            "from config image_size; parity with transformers is exact only at this size",
        )
    )
    del patch
    arch = dinov2_arch_name(embed_dim, regs, swiglu)
    return Converted(
        arch, model_args, apply_timm_filter(arch, model_args, sd), assumptions=assumptions
    )


# ---------------------------------------------------------------------------------------------
# CLIP and SigLIP vision towers

_HF_CLIP_RULES = [
    (r"^encoder\.layers\.(\d+)\.", r"blocks.\1."),
    (r"\.self_attn\.(q|k|v)_proj\.", r".attn.\1."),
    (r"\.self_attn\.out_proj\.", ".attn.proj."),
    (r"\.layer_norm(1|2)\.", r".norm\1."),
    (r"^pre_layrnorm\.", "norm_pre."),
    (r"^post_layernorm\.", "norm."),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^head\.probe$", "attn_pool.latent"),
    (r"^head\.attention\.out_proj\.", "attn_pool.proj."),
    (r"^head\.layernorm\.", "attn_pool.norm."),
    (r"^head\.mlp\.", "attn_pool.mlp."),
]


def _hf_clip_style(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower of a CLIP/SigLIP checkpoint in timm names; text tower and scales dropped."""
    sd = {
        k: v
        for k, v in sd.items()
        if not k.startswith(("text_model.", "text_projection", "logit_"))
        and not k.endswith("position_ids")
    }
    sd = strip_prefix(sd, ("vision_model.",))
    out = {rename_key(k, _HF_CLIP_RULES): v for k, v in sd.items()}
    for i in {int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))}:
        join_qkv(out, f"blocks.{i}.attn.", "q", "k", "v", "qkv")
    pos = out.pop("embeddings.position_embedding.weight")
    out["pos_embed"] = pos.unsqueeze(0)
    if "embeddings.class_embedding" in out:
        out["cls_token"] = out.pop("embeddings.class_embedding").reshape(1, 1, -1)
    return out


def _tower(config: dict) -> dict:
    return dict(config.get("vision_config") or config)


def _tower_args(
    vcfg: dict, assumptions: list[Assumption], act_default: str, eps_default: float
) -> dict:
    embed_dim = int(config_value(vcfg, "hidden_size", 768, assumptions))
    heads = int(config_value(vcfg, "num_attention_heads", 12, assumptions))
    assumptions.append(Assumption("num_heads", str(heads), "from config num_attention_heads"))
    return dict(
        img_size=int(config_value(vcfg, "image_size", 224, assumptions)),
        patch_size=int(config_value(vcfg, "patch_size", 16, assumptions)),
        embed_dim=embed_dim,
        depth=int(config_value(vcfg, "num_hidden_layers", 12, assumptions)),
        num_heads=heads,
        mlp_ratio=exact_mlp_ratio(
            int(config_value(vcfg, "intermediate_size", 3072, assumptions)), embed_dim
        ),
        qkv_bias=True,
        norm_layer=layer_norm_with_eps(config_layer_norm_eps(vcfg, eps_default, assumptions)),
        act_layer=config_activation(vcfg, act_default, assumptions),
        reg_tokens=0,
        no_embed_class=False,
        final_norm=True,
        fc_norm=False,
        init_values=None,
    )


def convert_hf_clip(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
    assumptions: list[Assumption] = []
    vcfg = _tower(config)
    sd = _hf_clip_style(sd)
    args = _tower_args(vcfg, assumptions, "quick_gelu", 1e-5)
    args.update(class_token=True, pre_norm=True, global_pool="token", num_classes=0)
    if "visual_projection.weight" in sd:
        # timm holds CLIP's bias-free projection as a head with zero bias, as its OpenAI filter does
        proj = sd.pop("visual_projection.weight")
        sd["head.weight"], sd["head.bias"] = proj, torch.zeros(proj.shape[0], dtype=proj.dtype)
        args["num_classes"] = int(proj.shape[0])
        assumptions.append(
            Assumption("head", "visual_projection with zero bias", "CLIP image embedding")
        )
    patch, img = args["patch_size"], args["img_size"]
    arch = registered_arch_name(
        "vit", args["embed_dim"], patch, f"clip_{img}", "vit_base_patch16_clip_224"
    )
    return Converted(arch, args, sd, assumptions=assumptions)


def convert_hf_siglip(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
    assumptions: list[Assumption] = []
    if "classifier.weight" in sd:
        raise VitdiagError(
            "SiglipForImageClassification checkpoints are not supported yet (mean-pooled head); "
            "convert the SiglipVisionModel weights instead."
        )
    vcfg = _tower(config)
    sd = _hf_clip_style(sd)
    args = _tower_args(vcfg, assumptions, "gelu_pytorch_tanh", 1e-6)
    in_w = sd.pop("head.attention.in_proj_weight", None)
    if in_w is not None:
        dim = in_w.shape[1]
        in_b = sd.pop("head.attention.in_proj_bias")
        sd["attn_pool.q.weight"], sd["attn_pool.kv.weight"] = in_w[:dim], in_w[dim:]
        sd["attn_pool.q.bias"], sd["attn_pool.kv.bias"] = in_b[:dim], in_b[dim:]
        pool = "map"
    else:
        pool = "avg"
        assumptions.append(
            Assumption(
                "pooling",
                "mean of tokens",
                "checkpoint has no attention-pool head (vision_use_head false)",
            )
        )
    args.update(class_token=False, pre_norm=False, global_pool=pool, num_classes=0)
    patch, img = args["patch_size"], args["img_size"]
    arch = registered_arch_name(
        "vit", args["embed_dim"], patch, f"siglip_{img}", "vit_base_patch16_siglip_224"
    )
    return Converted(arch, args, sd, assumptions=assumptions)


# ---------------------------------------------------------------------------------------------
# preprocessing from preprocessor_config.json

# PIL resample codes as transformers stores them in preprocessor_config.json.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


_FAMILY_DATA = {
    # transformers image-processor defaults per family: mean, std, interpolation, crop_pct
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0),
    "deit": (IMAGENET_MEAN, IMAGENET_STD, "bicubic", 224 / 256),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD, "bicubic", 224 / 256),
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD, "bicubic", 224 / 256),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic", 1.0),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0),
}


def _hw(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, Mapping) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


def hf_data_config(
    kind: str,
    pre: Mapping[str, Any] | None,
    model_args: Mapping[str, Any],
    assumptions: list[Assumption],
) -> dict[str, Any]:
    family = kind.split(":")[1]
    mean, std, interp, crop_pct = _FAMILY_DATA[family]
    img = int(model_args["img_size"])
    if not pre:
        assumptions.append(
            Assumption(
                "preprocessing",
                f"mean {mean}, std {std}, {interp}, crop_pct {crop_pct:g}",
                f"transformers {family} image-processor default; no preprocessor_config.json",
            )
        )
        return dict(
            input_size=(3, img, img), mean=mean, std=std, interpolation=interp, crop_pct=crop_pct
        )
    size = pre.get("size", {})
    crop = _hw(pre.get("crop_size")) if pre.get("do_center_crop") else None
    out: dict[str, Any] = dict(
        mean=tuple(pre.get("image_mean", mean)),
        std=tuple(pre.get("image_std", std)),
        interpolation=_PIL_RESAMPLE.get(pre.get("resample"), interp),
    )
    if crop is not None:
        short = size.get("shortest_edge") if isinstance(size, Mapping) else None
        resized = _hw(size)
        edge = short or (min(resized) if resized else min(crop))
        out.update(input_size=(3, *crop), crop_pct=min(crop) / edge, crop_mode="center")
    elif _hw(size) is not None:
        # a fixed height x width resize without crop is timm's 'squash'
        out.update(input_size=(3, *_hw(size)), crop_pct=1.0, crop_mode="squash")
    else:
        edge = int(size.get("shortest_edge", img)) if isinstance(size, Mapping) else img
        out.update(input_size=(3, edge, edge), crop_pct=1.0, crop_mode="center")
    assumptions.append(Assumption("preprocessing", str(out), "from preprocessor_config.json"))
    return out
