"""The original DINOv2 layout (facebookresearch/dinov2 `blocks.N.ls1.gamma`, `mask_token`).

transformers DINOv2 checkpoints are renamed to this layout first, so timm's own checkpoint filter
does the token algebra for both."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from vitdiag.loading.convert.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIZE_NAMES,
    Assumption,
    Converted,
    apply_timm_filter,
    bicubic_data_config,
    exact_mlp_ratio,
    layer_norm_with_eps,
    square_grid_side,
)


def dinov2_arch_name(embed_dim: int, regs: int, swiglu: bool) -> str:
    import timm

    size = SIZE_NAMES.get(embed_dim)
    reg = f"reg{regs}_" if regs else ""
    name = f"vit_{size}_patch14_{reg}dinov2"
    if size and timm.is_model(name):
        return name
    fallback = "vit_giant_patch14_" if swiglu else "vit_base_patch14_"
    return f"{fallback}{'reg4_' if regs else ''}dinov2"


def dinov2_model_args(
    sd: Mapping[str, torch.Tensor],
    img: int | None,
    heads: int,
    eps: float,
    act: str,
    qkv_bias: bool,
) -> dict[str, Any]:
    """timm kwargs for an original-layout DINOv2 state dict (shapes) plus what shapes cannot say."""
    proj = sd["patch_embed.proj.weight"]
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    regs = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    if img is None:
        img = square_grid_side(int(sd["pos_embed"].shape[1]) - 1, "pos_embed") * patch
    swiglu = "blocks.0.mlp.w12.weight" in sd
    fc1 = sd["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"]
    args: dict[str, Any] = dict(
        img_size=img,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=exact_mlp_ratio(int(fc1.shape[0]), embed_dim),
        qkv_bias=qkv_bias,
        norm_layer=layer_norm_with_eps(eps),
        act_layer=act,
        class_token=True,
        reg_tokens=regs,
        # timm folds the class position into cls_token when registers are present
        no_embed_class=bool(regs),
        pre_norm=False,
        final_norm=True,
        fc_norm=False,
        global_pool="token",
        init_values=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        num_classes=0,
    )
    if swiglu:
        from timm.layers import SwiGLUPacked

        args["mlp_layer"] = SwiGLUPacked
    return args


def convert_dinov2_original(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
    assumptions: list[Assumption] = []
    embed_dim = int(sd["patch_embed.proj.weight"].shape[0])
    heads = embed_dim // 64
    assumptions.append(
        Assumption(
            "num_heads",
            str(heads),
            "width // 64, as in every released DINOv2 (S/B/L/g)",
            "--model-arg num_heads=N",
        )
    )
    swiglu = "blocks.0.mlp.w12.weight" in sd
    act = "silu" if swiglu else "gelu"
    assumptions.append(Assumption("LayerNorm eps", "1e-06", "DINOv2 code default"))
    assumptions.append(
        Assumption(
            "activation", act, "DINOv2 code: SwiGLU for w12/w3 weights, exact GELU otherwise"
        )
    )
    args = dinov2_model_args(sd, None, heads, 1e-6, act, "blocks.0.attn.qkv.bias" in sd)
    regs = int(args["reg_tokens"])
    arch = dinov2_arch_name(embed_dim, regs, swiglu)
    out = Converted(arch, args, apply_timm_filter(arch, args, sd), assumptions=assumptions)
    out.data_config = bicubic_data_config(args["img_size"], IMAGENET_MEAN, IMAGENET_STD)
    assumptions.append(
        Assumption(
            "preprocessing",
            "ImageNet mean/std, bicubic",
            "DINOv2 training default, not in the weights",
        )
    )
    return out
