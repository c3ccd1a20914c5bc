"""transformers BEiT and Swin, the two families whose attention carries a learned relative-position
bias table, converted to timm `beit_*` and `swin_*`.

Both are read in the spelling transformers saves (`attention.attention.query`, legacy) and in its
in-memory spelling (`attention.q_proj`), as the ViT converter is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.loading.convert.common import (
    Assumption,
    Converted,
    config_layer_norm_eps,
    config_value,
    exact_mlp_ratio,
    join_qkv,
    layer_norm_with_eps,
    registered_arch_name,
    rename_key,
    strip_prefix,
)
from vitdiag.loading.convert.transformers import hf_data_config

# Rules shared by both families' blocks; legacy spelling first, then transformers 5 in-memory.
_BLOCK_RULES = [
    (r"\.attention\.(?:attention|self)\.query\.", ".attn.q."),
    (r"\.attention\.(?:attention|self)\.key\.", ".attn.k."),
    (r"\.attention\.(?:attention|self)\.value\.", ".attn.v."),
    (r"\.attention\.(q|k|v)_proj\.", r".attn.\1."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
]


def _gelu_only(config: Mapping[str, Any], family: str, assumptions: list[Assumption]) -> None:
    """timm's Beit and SwinTransformer build their MLPs with nn.GELU and take no activation."""
    hidden_act = str(config_value(config, "hidden_act", "gelu", assumptions))
    if hidden_act != "gelu":
        raise VitdiagError(
            f"config.json hidden_act {hidden_act!r}: timm's {family} only has exact GELU, so this "
            "checkpoint cannot be converted; only hidden_act 'gelu' is supported for it."
        )
    assumptions.append(Assumption("activation", "gelu", "from config hidden_act 'gelu'"))


def _drop_buffers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Index tables and shift masks are rebuilt from the window size; older saves persisted them."""
    return {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}


def _drop_mask_token(sd: dict[str, torch.Tensor], assumptions: list[Assumption]) -> None:
    if sd.pop("embeddings.mask_token", None) is not None:
        assumptions.append(
            Assumption("mask_token", "dropped", "used only for masked-image pretraining")
        )


def _blocks(sd: dict[str, torch.Tensor], pattern: str) -> list[str]:
    """The block prefixes (`blocks.3.`, `layers.1.blocks.0.`) present in a renamed state dict."""
    return sorted({m.group(0) for k in sd if (m := re.match(pattern, k))})


def _side(value: Any, what: str) -> int:
    """A square image or patch size from config.json, which may hold an int or [h, w]."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise VitdiagError(
                f"config.json {what} {list(value)} is not square; vitdiag converts square "
                "BEiT and Swin models only."
            )
        value = value[0]
    return int(value)


# ---------------------------------------------------------------------------------------------
# BEiT

_BEIT_RULES = [
    (r"^(?:encoder\.layer|layers)\.(\d+)\.", r"blocks.\1."),
    (
        r"\.attention\.attention\.relative_position_bias\.relative_position_bias_table$",
        ".attn.relative_position_bias_table",
    ),
    (
        r"^(blocks\.\d+)\.relative_position_bias\.relative_position_bias_table$",
        r"\1.attn.relative_position_bias_table",
    ),
    (
        r"^(?:encoder\.relative_position_bias|shared_position_bias)\.",
        "rel_pos_bias.",
    ),
    *_BLOCK_RULES,
    (r"\.lambda_(1|2)$", r".gamma_\1"),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^pooler\.layernorm\.", "fc_norm."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def _beit_qkv(sd: dict[str, torch.Tensor], block: str) -> None:
    """timm's BEiT keeps one qkv weight and separate q/v biases; the key has no bias in either."""
    a = f"{block}attn."
    sd[f"{a}qkv.weight"] = torch.cat([sd.pop(f"{a}{n}.weight") for n in "qkv"], dim=0)
    if f"{a}q.bias" in sd:
        sd[f"{a}q_bias"], sd[f"{a}v_bias"] = sd.pop(f"{a}q.bias"), sd.pop(f"{a}v.bias")


def convert_hf_beit(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
    assumptions: list[Assumption] = []
    sd = _drop_buffers(strip_prefix(sd, ("beit.",)))
    _drop_mask_token(sd, assumptions)
    sd = {rename_key(k, _BEIT_RULES): v for k, v in sd.items()}
    for block in _blocks(sd, r"blocks\.\d+\."):
        _beit_qkv(sd, block)

    mean_pool = bool(config_value(config, "use_mean_pooling", True, assumptions))
    if mean_pool and "fc_norm.weight" not in sd:
        raise VitdiagError(
            "this BEiT checkpoint mean-pools (use_mean_pooling) but was saved without its pooler "
            "LayerNorm (BeitModel with add_pooling_layer=False), which timm's Beit cannot "
            "express; save BeitModel with its pooler or BeitForImageClassification instead."
        )
    _gelu_only(config, "Beit", assumptions)
    embed_dim = int(config_value(config, "hidden_size", 768, assumptions))
    patch = _side(config_value(config, "patch_size", 16, assumptions), "patch_size")
    img = _side(config_value(config, "image_size", 224, assumptions), "image_size")
    heads = int(config_value(config, "num_attention_heads", 12, assumptions))
    assumptions.append(Assumption("num_heads", str(heads), "from config num_attention_heads"))
    # any non-zero value builds the gamma tensors; the checkpoint's values replace it
    scale = float(config.get("layer_scale_init_value") or 0.1)
    model_args = dict(
        img_size=img,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=int(config_value(config, "num_hidden_layers", 12, assumptions)),
        num_heads=heads,
        mlp_ratio=exact_mlp_ratio(
            int(config_value(config, "intermediate_size", 3072, assumptions)), embed_dim
        ),
        qkv_bias="blocks.0.attn.q_bias" in sd,
        norm_layer=layer_norm_with_eps(config_layer_norm_eps(config, 1e-12, assumptions)),
        # 0, not None: timm.create_model drops None kwargs, leaving beit_base's 0.1 in place
        init_values=scale if "blocks.0.gamma_1" in sd else 0.0,
        use_abs_pos_emb="pos_embed" in sd,
        use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in sd,
        use_shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in sd,
        global_pool="avg" if mean_pool else "token",
        use_fc_norm=mean_pool,
        num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
    )
    pooling = "mean of patch tokens, then LayerNorm" if mean_pool else "class token"
    assumptions.append(Assumption("pooling", pooling, "from config use_mean_pooling"))
    assumptions.append(
        Assumption(
            "position tables",
            f"{img} px",
            "from config image_size; parity with transformers is exact only at this size",
        )
    )
    arch = registered_arch_name("beit", embed_dim, patch, str(img), "beit_base_patch16_224")
    return Converted(arch, model_args, sd, assumptions=assumptions)


# ---------------------------------------------------------------------------------------------
# Swin (v1)

_SWIN_RULES = [
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.", r"layers.\1.blocks.\2."),
    (r"\.attention\.self\.relative_position_bias_table$", ".attn.relative_position_bias_table"),
    (
        r"\.attention\.relative_position_bias\.relative_position_bias_table$",
        ".attn.relative_position_bias_table",
    ),
    *_BLOCK_RULES,
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head.fc."),
]

# timm names for the released (embed_dim, depths); model_args pin the sizes anyway.
_SWIN_SIZES = {
    (96, (2, 2, 6, 2)): "tiny",
    (96, (2, 2, 18, 2)): "small",
    (128, (2, 2, 18, 2)): "base",
    (192, (2, 2, 18, 2)): "large",
}


def _swin_downsample(key: str) -> str:
    """transformers merges patches at the end of stage i, timm at the start of stage i + 1."""
    m = re.match(r"^encoder\.layers\.(\d+)\.downsample\.", key)
    return f"layers.{int(m.group(1)) + 1}.downsample.{key[m.end() :]}" if m else key


def _swin_arch(embed_dim: int, depths: tuple[int, ...], patch: int, window: int, img: int) -> str:
    import timm

    size = _SWIN_SIZES.get((embed_dim, depths))
    name = f"swin_{size}_patch{patch}_window{window}_{img}"
    return name if size and timm.is_model(name) else "swin_tiny_patch4_window7_224"


def _swin_eps(config: Mapping[str, Any], assumptions: list[Assumption]) -> float:
    """transformers builds the patch-embedding and patch-merging norms with torch's default eps
    (1e-5) whatever layer_norm_eps says; timm has one norm layer for all of them."""
    eps = config_layer_norm_eps(config, 1e-5, assumptions)
    if eps != 1e-5:
        assumptions.append(
            Assumption(
                "patch-embedding and merging LayerNorm eps",
                f"{eps:g}",
                "timm uses one eps for every norm where transformers keeps 1e-5 for these; "
                "outputs differ from transformers by about the eps difference",
                "--model-arg to rebuild with another norm_layer",
            )
        )
    return eps


def convert_hf_swin(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
    assumptions: list[Assumption] = []
    sd = _drop_buffers(strip_prefix(sd, ("swin.",)))
    _drop_mask_token(sd, assumptions)
    if "embeddings.position_embeddings" in sd or config.get("use_absolute_embeddings"):
        raise VitdiagError(
            "this Swin checkpoint has an absolute position embedding (use_absolute_embeddings), "
            "which timm's SwinTransformer does not have; only Swin without it can be converted."
        )
    sd = {rename_key(_swin_downsample(k), _SWIN_RULES): v for k, v in sd.items()}
    for block in _blocks(sd, r"layers\.\d+\.blocks\.\d+\."):
        join_qkv(sd, f"{block}attn.", "q", "k", "v", "qkv")

    _gelu_only(config, "SwinTransformer", assumptions)
    embed_dim = int(config_value(config, "embed_dim", 96, assumptions))
    depths = tuple(int(d) for d in config_value(config, "depths", [2, 2, 6, 2], assumptions))
    heads = tuple(int(h) for h in config_value(config, "num_heads", [3, 6, 12, 24], assumptions))
    assumptions.append(Assumption("num_heads", str(heads), "from config num_heads"))
    patch = _side(config_value(config, "patch_size", 4, assumptions), "patch_size")
    img = _side(config_value(config, "image_size", 224, assumptions), "image_size")
    window = int(config_value(config, "window_size", 7, assumptions))
    eps = _swin_eps(config, assumptions)
    model_args: dict[str, Any] = dict(
        img_size=img,
        patch_size=patch,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=window,
        mlp_ratio=float(config_value(config, "mlp_ratio", 4.0, assumptions)),
        qkv_bias=bool(config_value(config, "qkv_bias", True, assumptions)),
        global_pool="avg",
        num_classes=int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0,
    )
    if eps != 1e-5:
        # only when needed: timm's own config.json cannot hold a norm_layer
        model_args["norm_layer"] = layer_norm_with_eps(eps)
    assumptions.append(
        Assumption(
            "window",
            f"{window} (shifted by {window // 2} in odd blocks)",
            "from config window_size; a stage whose grid is not larger than the window "
            "uses its whole grid unshifted, in timm as in transformers",
        )
    )
    arch = _swin_arch(embed_dim, depths, patch, window, img)
    return Converted(arch, model_args, sd, assumptions=assumptions)


# ---------------------------------------------------------------------------------------------
# preprocessing

# PIL resample code BEiT's image processor defaults to (bicubic), for a partial preprocessor file.
_BICUBIC = 3


def relpos_data_config(
    kind: str,
    pre: Mapping[str, Any] | None,
    model_args: Mapping[str, Any],
    assumptions: list[Assumption],
) -> dict[str, Any]:
    """Preprocessing from preprocessor_config.json, or the family's image-processor defaults."""
    if kind == "transformers:swin":
        # AutoImageProcessor gives Swin the ViT image processor, so its defaults are ViT's
        return hf_data_config("transformers:vit", pre, model_args, assumptions)
    mean = std = (0.5, 0.5, 0.5)
    if pre:
        # BeitImageProcessor: mean/std 0.5, bicubic; the file's own values win
        filled = {"image_mean": list(mean), "image_std": list(std), "resample": _BICUBIC}
        return hf_data_config("transformers:vit", {**filled, **pre}, model_args, assumptions)
    img = int(model_args["img_size"])
    out = dict(
        input_size=(3, img, img),
        mean=mean,
        std=std,
        interpolation="bicubic",
        crop_pct=1.0,
        crop_mode="squash",
    )
    assumptions.append(
        Assumption(
            "preprocessing",
            f"mean {mean}, std {std}, bicubic, crop_pct 1",
            "transformers beit image-processor default; no preprocessor_config.json",
        )
    )
    return out
