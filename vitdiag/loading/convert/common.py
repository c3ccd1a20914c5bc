"""What every converter shares: the result types, config reading that records its defaults,
key renaming, and the checks against the timm model built on the meta device."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from vitdiag.errors import VitdiagError

# transformers hidden_act -> timm act_layer name (timm.layers.get_act_layer).
_ACTS = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}

SIZE_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1536: "giant"}

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


def check_loadable(kind: str, out: Converted) -> None:
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


def apply_timm_filter(arch: str, model_args: dict[str, Any], sd: dict[str, torch.Tensor]) -> dict:
    """Run timm's own checkpoint filter against the chosen model, built on the meta device."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(arch, pretrained=False, device="meta", **model_args)
    return dict(checkpoint_filter_fn(dict(sd), model))


def layer_norm_with_eps(eps: float) -> partial:
    """timm's `norm_layer` argument: nn.LayerNorm with the checkpoint's eps."""
    return partial(nn.LayerNorm, eps=eps)


def registered_arch_name(
    prefix: str, embed_dim: int, patch: int, suffix: str, fallback: str
) -> str:
    """A registered timm name for the family; model_args override its sizes anyway."""
    import timm

    size = SIZE_NAMES.get(embed_dim)
    if size:
        name = f"{prefix}_{size}_patch{patch}_{suffix}"
        if timm.is_model(name):
            return name
    return fallback


def join_qkv(sd: dict[str, torch.Tensor], prefix: str, q: str, k: str, v: str, out: str) -> None:
    """Concatenate separate q/k/v projections into timm's fused qkv, weights and biases."""
    for part in ("weight", "bias"):
        names = [f"{prefix}{n}.{part}" for n in (q, k, v)]
        if all(n in sd for n in names):
            sd[f"{prefix}{out}.{part}"] = torch.cat([sd.pop(n) for n in names], dim=0)


def rename_key(key: str, rules: list[tuple[str, str]]) -> str:
    """Apply every (pattern, replacement) rule to `key`, in order."""
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def strip_prefix(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop the model prefix (`vit.`, `vision_model.`...) from every key that has it."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def config_value(
    config: Mapping[str, Any], name: str, default: Any, assumptions: list[Assumption]
) -> Any:
    """A config value, or the transformers default recorded as an assumption."""
    if name in config:
        return config[name]
    assumptions.append(Assumption(name, repr(default), "transformers default, not in config.json"))
    return default


def config_activation(
    config: Mapping[str, Any], default: str, assumptions: list[Assumption]
) -> str:
    hidden_act = str(config_value(config, "hidden_act", default, assumptions))
    if hidden_act not in _ACTS:
        raise VitdiagError(
            f"config.json hidden_act {hidden_act!r} has no timm equivalent here; "
            f"supported: {', '.join(sorted(_ACTS))}."
        )
    act = _ACTS[hidden_act]
    assumptions.append(Assumption("activation", act, f"from config hidden_act {hidden_act!r}"))
    return act


def config_layer_norm_eps(
    config: Mapping[str, Any], default: float, assumptions: list[Assumption]
) -> float:
    eps = float(config_value(config, "layer_norm_eps", default, assumptions))
    assumptions.append(Assumption("LayerNorm eps", f"{eps:g}", "from config layer_norm_eps"))
    return eps


def bicubic_data_config(img: int, mean: tuple, std: tuple) -> dict[str, Any]:
    """The preprocessing of a source whose files record none: square, bicubic, no crop."""
    return dict(input_size=(3, img, img), mean=mean, std=std, interpolation="bicubic", crop_pct=1.0)


def square_grid_side(num_tokens: int, what: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise VitdiagError(
            f"{what} holds {num_tokens} patch positions, not a square grid; pass the image size "
            "with --model-arg img_size=H,W."
        )
    return side


def exact_mlp_ratio(hidden: int, dim: int) -> float:
    """mlp_ratio such that timm's int(dim * ratio) gives back `hidden` despite float rounding."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim
