"""Turn checkpoints saved by transformers, open_clip and the original DINOv2 code into timm ones.

Pure functions over a config dict and a state dict: no transformers or open_clip import. The
result names a registered timm architecture plus `model_args` that pin everything the weights
depend on but do not show (heads, LayerNorm eps, activation, pooling), and lists every value that
was assumed rather than read, with the option that overrides it. SPEC §7 has the layouts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from vitdiag.errors import VitdiagError

KINDS = (
    "transformers:vit",
    "transformers:deit",
    "transformers:dinov2",
    "transformers:dinov2_with_registers",
    "transformers:clip",
    "transformers:siglip",
    "open_clip",
    "dinov2_original",
)

# config.json model_type -> kind; full clip/siglip configs keep the tower under vision_config.
_MODEL_TYPES = {
    "vit": "transformers:vit",
    "deit": "transformers:deit",
    "dinov2": "transformers:dinov2",
    "dinov2_with_registers": "transformers:dinov2_with_registers",
    "clip": "transformers:clip",
    "clip_vision_model": "transformers:clip",
    "siglip": "transformers:siglip",
    "siglip_vision_model": "transformers:siglip",
}

# transformers hidden_act -> timm act_layer name (timm.layers.get_act_layer).
_ACTS = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}

_SIZE_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1536: "giant"}

# PIL resample codes as transformers stores them in preprocessor_config.json.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Assumption(NamedTuple):
    """A value the weights do not show: what, the value used, its source, how to change it."""

    what: str
    value: str
    source: str
    override: str = ""

    def __str__(self) -> str:
        text = f"{self.what} {self.value} ({self.source})"
        return f"{text}; override with {self.override}" if self.override else text


@dataclass
class Converted:
    """A foreign checkpoint as timm sees it: `timm.create_model(arch, **model_args)` loads
    `state_dict` with strict=True."""

    arch: str
    model_args: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    data_config: dict[str, Any] = field(default_factory=dict)
    assumptions: list[Assumption] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# detection


def detect(config: Mapping[str, Any] | None, state_dict_keys: Iterable[str]) -> str | None:
    """Name the source of a checkpoint, or None for a timm checkpoint (or one we do not know).

    `config` is the parsed config.json next to the weights (transformers), or open_clip's
    open_clip_config.json; `state_dict_keys` the tensor names.
    """
    keys = list(state_dict_keys)
    if config and "model_type" in config:
        model_type = str(config["model_type"])
        if model_type not in _MODEL_TYPES:
            supported = ", ".join(sorted(_MODEL_TYPES))
            raise VitdiagError(
                f"config.json has model_type {model_type!r}, which vitdiag cannot convert; "
                f"supported model types: {supported}."
            )
        return _MODEL_TYPES[model_type]
    if config and "model_cfg" in config:
        return "open_clip"
    if any(k.startswith(("visual.", "module.visual.")) for k in keys):
        return "open_clip"
    keyset = set(keys)
    if "mask_token" in keyset and any(re.match(r"blocks\.\d+\.ls1\.gamma$", k) for k in keys):
        return "dinov2_original"
    if any(
        k.endswith(
            ("embeddings.patch_embeddings.projection.weight", "embeddings.patch_embedding.weight")
        )
        for k in keys
    ):
        raise VitdiagError(
            "the weights look like a transformers checkpoint but no config.json with model_type "
            "was found; put the config.json saved with the model next to the weights."
        )
    return None


# ---------------------------------------------------------------------------------------------
# entry point


def convert(
    kind: str,
    config: Mapping[str, Any] | None,
    state_dict: Mapping[str, torch.Tensor],
    preprocessor: Mapping[str, Any] | None = None,
) -> Converted:
    """Convert `state_dict` of source `kind` (see `detect`) to timm.

    `preprocessor` is transformers' preprocessor_config.json when present; it fills
    `data_config` (otherwise the family default is used and listed as an assumption).
    """
    converters = {
        "transformers:vit": _convert_hf_vit,
        "transformers:deit": _convert_hf_vit,
        "transformers:dinov2": _convert_hf_dinov2,
        "transformers:dinov2_with_registers": _convert_hf_dinov2,
        "transformers:clip": _convert_hf_clip,
        "transformers:siglip": _convert_hf_siglip,
        "open_clip": _convert_open_clip,
        "dinov2_original": _convert_dinov2_original,
    }
    if kind not in converters:
        raise VitdiagError(f"unknown checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}.")
    out = converters[kind](kind, dict(config or {}), dict(state_dict))
    if kind.startswith("transformers:"):
        out.data_config = _hf_data_config(kind, preprocessor, out.model_args, out.assumptions)
    _check_loadable(kind, out)
    return out


def _check_loadable(kind: str, out: Converted) -> None:
    """Compare names and shapes with the timm model on the meta device, so a layout this module
    does not know fails here with the offending keys instead of deep inside load_state_dict."""
    import timm

    model = timm.create_model(out.arch, pretrained=False, device="meta", **out.model_args)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in out.state_dict.items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or shapes:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "") or "none"

        raise VitdiagError(
            f"the {kind} checkpoint does not map onto timm {out.arch}: missing {few(missing)}; "
            f"unexpected {few(extra)}; wrong shape {few(shapes)}; the layout is a variant vitdiag "
            "does not convert yet."
        )


# ---------------------------------------------------------------------------------------------
# shared helpers


def _layer_norm(eps: float) -> partial:
    return partial(nn.LayerNorm, eps=eps)


def _arch_name(prefix: str, embed_dim: int, patch: int, suffix: str, fallback: str) -> str:
    """A registered timm name for the family; model_args override its sizes anyway."""
    import timm

    size = _SIZE_NAMES.get(embed_dim)
    if size:
        name = f"{prefix}_{size}_patch{patch}_{suffix}"
        if timm.is_model(name):
            return name
    return fallback


def _join_qkv(sd: dict[str, torch.Tensor], prefix: str, q: str, k: str, v: str, out: str) -> None:
    """Concatenate separate q/k/v projections into timm's fused qkv, weights and biases."""
    for part in ("weight", "bias"):
        names = [f"{prefix}{n}.{part}" for n in (q, k, v)]
        if all(n in sd for n in names):
            sd[f"{prefix}{out}.{part}"] = torch.cat([sd.pop(n) for n in names], dim=0)


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _strip_prefix(
    sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Drop the model prefix (`vit.`, `vision_model.`...) from every key that has it."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def _cfg(config: Mapping[str, Any], name: str, default: Any, assumptions: list[Assumption]) -> Any:
    """A config value, or the transformers default recorded as an assumption."""
    if name in config:
        return config[name]
    assumptions.append(Assumption(name, repr(default), "transformers default, not in config.json"))
    return default


def _act(config: Mapping[str, Any], default: str, assumptions: list[Assumption]) -> str:
    hidden_act = str(_cfg(config, "hidden_act", default, assumptions))
    if hidden_act not in _ACTS:
        raise VitdiagError(
            f"config.json hidden_act {hidden_act!r} has no timm equivalent here; "
            f"supported: {', '.join(sorted(_ACTS))}."
        )
    act = _ACTS[hidden_act]
    assumptions.append(Assumption("activation", act, f"from config hidden_act {hidden_act!r}"))
    return act


def _eps(config: Mapping[str, Any], default: float, assumptions: list[Assumption]) -> float:
    eps = float(_cfg(config, "layer_norm_eps", default, assumptions))
    assumptions.append(Assumption("LayerNorm eps", f"{eps:g}", "from config layer_norm_eps"))
    return eps


def _square_grid(num_tokens: int, what: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise VitdiagError(
            f"{what} holds {num_tokens} patch positions, not a square grid; pass the image size "
            "with --model-arg img_size=H,W."
        )
    return side


# ---------------------------------------------------------------------------------------------
# transformers ViT / DeiT

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
    sd = _strip_prefix(sd, (model_prefix,))
    out = {_rename(k, _HF_VIT_LAYER_RULES): v for k, v in sd.items()}
    for i in {int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))}:
        _join_qkv(out, f"blocks.{i}.attn.", "q", "k", "v", "qkv")
    return out


def _convert_hf_vit(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
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

    embed_dim = int(_cfg(config, "hidden_size", 768, assumptions))
    patch = int(_cfg(config, "patch_size", 16, assumptions))
    img = int(_cfg(config, "image_size", 224, assumptions))
    heads = int(_cfg(config, "num_attention_heads", 12, assumptions))
    assumptions.append(Assumption("num_heads", str(heads), "from config num_attention_heads"))
    model_args = dict(
        img_size=img,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=int(_cfg(config, "num_hidden_layers", 12, assumptions)),
        num_heads=heads,
        mlp_ratio=int(_cfg(config, "intermediate_size", 3072, assumptions)) / embed_dim,
        qkv_bias=bool(_cfg(config, "qkv_bias", True, assumptions)),
        norm_layer=_layer_norm(_eps(config, 1e-12, assumptions)),
        act_layer=_act(config, "gelu", assumptions),
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
        arch = _arch_name("vit", embed_dim, patch, str(img), "vit_base_patch16_224")
    return Converted(arch, model_args, sd, assumptions=assumptions)


def _deit_distilled_name(embed_dim: int, patch: int, img: int) -> str:
    import timm

    size = _SIZE_NAMES.get(embed_dim, "base")
    name = f"deit_{size}_distilled_patch{patch}_{img}"
    return name if timm.is_model(name) else "deit_base_distilled_patch16_224"


# ---------------------------------------------------------------------------------------------
# transformers DINOv2 (with and without registers), via the original DINOv2 layout


def _convert_hf_dinov2(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
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
    sd = {_rename(k, rules): v for k, v in sd.items()}
    for k in [k for k in sd if ".mlp.gate_proj." in k]:
        # transformers 5 in-memory split of weights_in: gate (SiLU side) first, as in w12
        up = k.replace("gate_proj", "up_proj")
        sd[k.replace("gate_proj", "w12")] = torch.cat([sd.pop(k), sd.pop(up)], dim=0)

    embed_dim = int(_cfg(config, "hidden_size", 768, assumptions))
    patch = int(_cfg(config, "patch_size", 14, assumptions))
    heads = int(_cfg(config, "num_attention_heads", 12, assumptions))
    assumptions.append(Assumption("num_heads", str(heads), "from config num_attention_heads"))
    swiglu = bool(_cfg(config, "use_swiglu_ffn", False, assumptions))
    regs = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    model_args = _dinov2_args(
        sd,
        img=int(_cfg(config, "image_size", 518, assumptions)),
        heads=heads,
        eps=_eps(config, 1e-6, assumptions),
        act="silu" if swiglu else _act(config, "gelu", assumptions),
        qkv_bias=bool(_cfg(config, "qkv_bias", True, assumptions)),
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
    arch = _dinov2_arch(embed_dim, regs, swiglu)
    return Converted(arch, model_args, _timm_filter(arch, model_args, sd), assumptions=assumptions)


def _dinov2_arch(embed_dim: int, regs: int, swiglu: bool) -> str:
    import timm

    size = _SIZE_NAMES.get(embed_dim)
    reg = f"reg{regs}_" if regs else ""
    name = f"vit_{size}_patch14_{reg}dinov2"
    if size and timm.is_model(name):
        return name
    fallback = "vit_giant_patch14_" if swiglu else "vit_base_patch14_"
    return f"{fallback}{'reg4_' if regs else ''}dinov2"


def _ratio(hidden: int, dim: int) -> float:
    """mlp_ratio such that timm's int(dim * ratio) gives back `hidden` despite float rounding."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def _dinov2_args(
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
        img = _square_grid(int(sd["pos_embed"].shape[1]) - 1, "pos_embed") * patch
    swiglu = "blocks.0.mlp.w12.weight" in sd
    fc1 = sd["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"]
    args: dict[str, Any] = dict(
        img_size=img,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=_ratio(int(fc1.shape[0]), embed_dim),
        qkv_bias=qkv_bias,
        norm_layer=_layer_norm(eps),
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


def _convert_dinov2_original(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
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
    args = _dinov2_args(sd, None, heads, 1e-6, act, "blocks.0.attn.qkv.bias" in sd)
    regs = int(args["reg_tokens"])
    arch = _dinov2_arch(embed_dim, regs, swiglu)
    out = Converted(arch, args, _timm_filter(arch, args, sd), assumptions=assumptions)
    out.data_config = dict(
        input_size=(3, args["img_size"], args["img_size"]),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bicubic",
        crop_pct=1.0,
    )
    assumptions.append(
        Assumption(
            "preprocessing",
            "ImageNet mean/std, bicubic",
            "DINOv2 training default, not in the weights",
        )
    )
    return out


def _timm_filter(arch: str, model_args: dict[str, Any], sd: dict[str, torch.Tensor]) -> dict:
    """Run timm's own checkpoint filter against the chosen model, built on the meta device."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(arch, pretrained=False, device="meta", **model_args)
    return dict(checkpoint_filter_fn(dict(sd), model))


# ---------------------------------------------------------------------------------------------
# transformers CLIP and SigLIP vision towers

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
    sd = _strip_prefix(sd, ("vision_model.",))
    out = {_rename(k, _HF_CLIP_RULES): v for k, v in sd.items()}
    for i in {int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))}:
        _join_qkv(out, f"blocks.{i}.attn.", "q", "k", "v", "qkv")
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
    embed_dim = int(_cfg(vcfg, "hidden_size", 768, assumptions))
    heads = int(_cfg(vcfg, "num_attention_heads", 12, assumptions))
    assumptions.append(Assumption("num_heads", str(heads), "from config num_attention_heads"))
    return dict(
        img_size=int(_cfg(vcfg, "image_size", 224, assumptions)),
        patch_size=int(_cfg(vcfg, "patch_size", 16, assumptions)),
        embed_dim=embed_dim,
        depth=int(_cfg(vcfg, "num_hidden_layers", 12, assumptions)),
        num_heads=heads,
        mlp_ratio=_ratio(int(_cfg(vcfg, "intermediate_size", 3072, assumptions)), embed_dim),
        qkv_bias=True,
        norm_layer=_layer_norm(_eps(vcfg, eps_default, assumptions)),
        act_layer=_act(vcfg, act_default, assumptions),
        reg_tokens=0,
        no_embed_class=False,
        final_norm=True,
        fc_norm=False,
        init_values=None,
    )


def _convert_hf_clip(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
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
    arch = _arch_name("vit", args["embed_dim"], patch, f"clip_{img}", "vit_base_patch16_clip_224")
    return Converted(arch, args, sd, assumptions=assumptions)


def _convert_hf_siglip(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
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
    arch = _arch_name(
        "vit", args["embed_dim"], patch, f"siglip_{img}", "vit_base_patch16_siglip_224"
    )
    return Converted(arch, args, sd, assumptions=assumptions)


# ---------------------------------------------------------------------------------------------
# open_clip (OpenAI layout `visual.*`, or a timm trunk `visual.trunk.*`)


def _convert_open_clip(kind: str, config: dict, sd: dict[str, torch.Tensor]) -> Converted:
    assumptions: list[Assumption] = []
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
    width = int(v["class_embedding"].shape[0])
    patch = int(v["conv1.weight"].shape[-1])
    grid = _square_grid(int(v["positional_embedding"].shape[0]) - 1, "visual.positional_embedding")
    depth = len({m.group(1) for k in v if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    hidden = int(v["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    if "head_width" in vcfg or "width" in vcfg:
        heads = width // int(vcfg.get("head_width", 64))
        assumptions.append(
            Assumption("num_heads", str(heads), "from open_clip config width // head_width")
        )
    else:
        heads = width // 64
        assumptions.append(
            Assumption(
                "num_heads",
                str(heads),
                "width // 64, open_clip's default head_width",
                "--model-arg num_heads=N",
            )
        )
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
    assumptions.append(
        Assumption("LayerNorm eps", "1e-05", "open_clip's LayerNorm (torch default)")
    )
    pool = str(vcfg.get("pool_type", "tok"))
    if pool not in ("tok", "avg"):
        raise VitdiagError(
            f"open_clip pool_type {pool!r} is not supported; expected 'tok' or 'avg'."
        )
    after_pool = bool(vcfg.get("final_ln_after_pool", False))
    args = dict(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=_ratio(hidden, width),
        qkv_bias=True,
        norm_layer=_layer_norm(1e-5),
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
    arch = _arch_name("vit", width, patch, f"clip_{grid * patch}", "vit_base_patch16_clip_224")
    out = Converted(arch, args, _timm_filter(arch, args, sd), assumptions=assumptions)
    pre = dict(config.get("preprocess_cfg") or {})
    out.data_config = dict(
        input_size=(3, grid * patch, grid * patch),
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
    return out


# ---------------------------------------------------------------------------------------------
# preprocessing from preprocessor_config.json

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


def _hf_data_config(
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
        args.update(num_heads=max(1, width // 64), act_layer=act, norm_layer=_layer_norm(1e-6))
        arch = _arch_name(
            "vit", width, int(args["patch_size"]), str(args["img_size"]), "vit_base_patch16_224"
        )
        assumptions += [
            Assumption(
                "num_heads", str(args["num_heads"]), "width // 64", "--model-arg num_heads=N"
            ),
            Assumption("activation", act, "timm ViT default", "--model-arg act_layer=NAME"),
            Assumption("LayerNorm eps", "1e-06", "timm ViT default"),
        ]
    out = Converted(arch, args, _timm_filter(arch, args, sd), assumptions=assumptions)
    out.data_config = dict(
        input_size=(3, args["img_size"], args["img_size"]),
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        interpolation="bicubic",
        crop_pct=1.0,
    )
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
        side = _square_grid(tokens, "trunk pos_embed")
    fc1 = sd["blocks.0.mlp.fc1.weight"]
    glu = int(sd["blocks.0.mlp.fc2.weight"].shape[1]) * 2 == int(fc1.shape[0])
    args: dict[str, Any] = dict(
        img_size=side * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}),
        mlp_ratio=_ratio(int(fc1.shape[0]), embed_dim),
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
