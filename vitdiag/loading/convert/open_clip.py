"""open_clip image towers: the OpenAI layout `visual.*`, or a timm trunk `visual.trunk.*`."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.loading.convert.common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Assumption,
    Converted,
    apply_timm_filter,
    bicubic_data_config,
    exact_mlp_ratio,
    layer_norm_with_eps,
    registered_arch_name,
    square_grid_side,
)


def convert_open_clip(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
    """An open_clip image tower in timm: the OpenAI layout here, a timm trunk further down."""
    prefix = "module.visual." if any(k.startswith("module.visual.") for k in sd) else "visual."
    model_cfg = dict(config.get("model_cfg") or {})
    vcfg = dict(model_cfg.get("vision_cfg") or {})
    if any(k.startswith(prefix + "trunk.") for k in sd):
        return _convert_open_clip_trunk(prefix, vcfg, sd)
    v = {k[len(prefix) :]: t for k, t in sd.items() if k.startswith(prefix)}
    if "class_embedding" not in v or "conv1.weight" not in v:
        raise VitdiagError(
            "the open_clip state dict has no visual.class_embedding / visual.conv1; only ViT image "
            "towers can be converted."
        )
    assumptions: list[Assumption] = []
    args = _openai_layout_args(v, config, model_cfg, vcfg, assumptions)
    img = int(args["img_size"])
    arch = registered_arch_name(
        "vit", args["embed_dim"], args["patch_size"], f"clip_{img}", "vit_base_patch16_clip_224"
    )
    out = Converted(arch, args, apply_timm_filter(arch, args, sd), assumptions=assumptions)
    out.data_config = _open_clip_data_config(config, img, assumptions)
    return out


def _openai_layout_args(
    v: Mapping[str, torch.Tensor],
    config: dict,
    model_cfg: dict,
    vcfg: dict,
    assumptions: list[Assumption],
) -> dict[str, Any]:
    """timm kwargs for the OpenAI layout (`visual.` stripped): shapes, then the open_clip config."""
    width = int(v["class_embedding"].shape[0])
    patch = int(v["conv1.weight"].shape[-1])
    grid = square_grid_side(
        int(v["positional_embedding"].shape[0]) - 1, "visual.positional_embedding"
    )
    depth = len({m.group(1) for k in v if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    hidden = int(v["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    heads = _open_clip_heads(width, vcfg, assumptions)
    act = _open_clip_activation(config, model_cfg, assumptions)
    assumptions.append(
        Assumption("LayerNorm eps", "1e-05", "open_clip's LayerNorm (torch default)")
    )
    pool = str(vcfg.get("pool_type", "tok"))
    if pool not in ("tok", "avg"):
        raise VitdiagError(
            f"open_clip pool_type {pool!r} is not supported; expected 'tok' or 'avg'."
        )
    after_pool = bool(vcfg.get("final_ln_after_pool", False))
    return dict(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=exact_mlp_ratio(hidden, width),
        qkv_bias=True,
        norm_layer=layer_norm_with_eps(1e-5),
        act_layer=act,
        class_token=True,
        reg_tokens=0,
        no_embed_class=False,
        pre_norm="ln_pre.weight" in v,
        final_norm=True,
        fc_norm=pool == "avg" and after_pool,
        global_pool="token" if pool == "tok" else "avg",
        init_values=None,
        num_classes=int(v["proj"].shape[1]) if "proj" in v else 0,
    )


def _open_clip_heads(width: int, vcfg: dict, assumptions: list[Assumption]) -> int:
    if "head_width" in vcfg or "width" in vcfg:
        heads = width // int(vcfg.get("head_width", 64))
        assumptions.append(
            Assumption("num_heads", str(heads), "from open_clip config width // head_width")
        )
        return heads
    heads = width // 64
    assumptions.append(
        Assumption(
            "num_heads",
            str(heads),
            "width // 64, open_clip's default head_width",
            "--model-arg num_heads=N",
        )
    )
    return heads


def _open_clip_activation(config: dict, model_cfg: dict, assumptions: list[Assumption]) -> str:
    if "quick_gelu" in model_cfg:
        act = "quick_gelu" if model_cfg["quick_gelu"] else "gelu"
        assumptions.append(Assumption("activation", act, "from open_clip config quick_gelu"))
    elif config:
        act = "gelu"
        assumptions.append(
            Assumption("activation", act, "open_clip config without quick_gelu (its default)")
        )
    else:
        # `visual.*` is OpenAI's layout, and OpenAI's released weights use QuickGELU.
        act = "quick_gelu"
        assumptions.append(
            Assumption(
                "activation",
                act,
                "assumed for OpenAI-style visual.* weights without open_clip_config.json "
                "(LAION/DataComp weights use gelu)",
                "--model-arg act_layer=gelu",
            )
        )
    return act


def _open_clip_data_config(config: dict, img: int, assumptions: list[Assumption]) -> dict[str, Any]:
    """open_clip_config.json's preprocess_cfg, or open_clip's OpenAI CLIP defaults."""
    pre = dict(config.get("preprocess_cfg") or {})
    data_config = dict(
        input_size=(3, img, img),
        mean=tuple(pre.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(pre.get("std", OPENAI_CLIP_STD)),
        interpolation=str(pre.get("interpolation", "bicubic")),
        crop_pct=1.0,
    )
    if not pre:
        assumptions.append(
            Assumption(
                "preprocessing",
                "OpenAI CLIP mean/std, bicubic",
                "open_clip default, not in the weights",
            )
        )
    return data_config


def _convert_open_clip_trunk(prefix: str, vcfg: dict, sd: dict[str, torch.Tensor]) -> Converted:
    """open_clip's TimmModel: a timm ViT under `visual.trunk.`, pooled by `timm_pool` and projected
    by a bias-free `visual.head.proj`."""
    import timm

    assumptions: list[Assumption] = []
    trunk = {k[len(prefix) + 6 :]: v for k, v in sd.items() if k.startswith(prefix + "trunk.")}
    unknown = sorted(
        k for k in sd if k.startswith(prefix + "head.") and not k.endswith("head.proj.weight")
    )
    if unknown or "pos_embed" not in trunk or "patch_embed.proj.weight" not in trunk:
        raise VitdiagError(
            f"this open_clip timm-trunk checkpoint is not a plain ViT with a linear projection "
            f"({', '.join(unknown[:3]) or 'no pos_embed'}); load the trunk with --arch instead."
        )
    args = _timm_vit_shapes(trunk)
    pool = str(vcfg.get("timm_pool", "avg"))
    if pool not in ("avg", "token", "map"):
        raise VitdiagError(
            f"open_clip timm_pool {pool!r} is not supported; expected avg, token or map."
        )
    # open_clip resets the trunk's pool without moving its final norm: norm, then pool
    args.update(global_pool=pool, fc_norm=False)
    proj = sd.get(prefix + "head.proj.weight")
    args["num_classes"] = int(proj.shape[0]) if proj is not None else 0
    name = vcfg.get("timm_model_name")
    if name and timm.is_model(name):
        arch = str(name)
        assumptions.append(
            Assumption(
                "heads, activation, LayerNorm eps", "timm defaults", f"of {arch} (open_clip config)"
            )
        )
    else:
        width = int(args["embed_dim"])
        act = "silu" if "mlp_layer" in args else "gelu"
        args.update(
            num_heads=max(1, width // 64), act_layer=act, norm_layer=layer_norm_with_eps(1e-6)
        )
        arch = registered_arch_name(
            "vit", width, int(args["patch_size"]), str(args["img_size"]), "vit_base_patch16_224"
        )
        assumptions += [
            Assumption(
                "num_heads", str(args["num_heads"]), "width // 64", "--model-arg num_heads=N"
            ),
            Assumption("activation", act, "timm ViT default", "--model-arg act_layer=NAME"),
            Assumption("LayerNorm eps", "1e-06", "timm ViT default"),
        ]
    out = Converted(arch, args, apply_timm_filter(arch, args, sd), assumptions=assumptions)
    out.data_config = bicubic_data_config(args["img_size"], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assumptions.append(
        Assumption(
            "preprocessing", "OpenAI CLIP mean/std, bicubic", "open_clip default, not in weights"
        )
    )
    return out


def _timm_vit_shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The VisionTransformer kwargs that a timm-layout state dict shows in its names and shapes."""
    proj = sd["patch_embed.proj.weight"]
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    class_token = "cls_token" in sd
    regs = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    tokens = int(sd["pos_embed"].shape[1])
    prefix = int(class_token) + regs
    side = math.isqrt(tokens - prefix)
    no_embed_class = side * side != tokens - prefix
    if no_embed_class:
        side = square_grid_side(tokens, "trunk pos_embed")
    fc1 = sd["blocks.0.mlp.fc1.weight"]
    glu = int(sd["blocks.0.mlp.fc2.weight"].shape[1]) * 2 == int(fc1.shape[0])
    args: dict[str, Any] = dict(
        img_size=side * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}),
        mlp_ratio=exact_mlp_ratio(int(fc1.shape[0]), embed_dim),
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        class_token=class_token,
        reg_tokens=regs,
        no_embed_class=no_embed_class,
        pre_norm="norm_pre.weight" in sd,
        final_norm="norm.weight" in sd,
        init_values=1e-5 if "blocks.0.ls1.gamma" in sd else None,
    )
    if glu:
        from timm.layers import SwiGLUPacked

        args["mlp_layer"] = SwiGLUPacked
    return args
