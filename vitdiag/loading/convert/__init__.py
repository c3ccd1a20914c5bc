"""Turn checkpoints saved by transformers, open_clip and the original DINOv2 code into timm ones.

Pure functions over a config dict and a state dict: no transformers or open_clip import. The
result names a registered timm architecture plus `model_args` that pin everything the weights
depend on but do not show (heads, LayerNorm eps, activation, pooling), and lists every value that
was assumed rather than read, with the option that overrides it. SPEC §7 has the layouts.

common        the result types and the helpers every converter shares
transformers  ViT, DeiT, DINOv2, CLIP and SigLIP saved by transformers, and their preprocessing
open_clip     open_clip image towers (`visual.*`, `visual.trunk.*`)
dinov2        the original DINOv2 layout, which transformers DINOv2 is renamed to
relpos        BEiT and Swin saved by transformers (relative-position bias tables)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.loading.convert.common import Assumption, Converted, check_loadable
from vitdiag.loading.convert.dinov2 import convert_dinov2_original
from vitdiag.loading.convert.open_clip import convert_open_clip
from vitdiag.loading.convert.relpos import (
    convert_hf_beit,
    convert_hf_swin,
    relpos_data_config,
)
from vitdiag.loading.convert.transformers import (
    convert_hf_clip,
    convert_hf_dinov2,
    convert_hf_siglip,
    convert_hf_vit,
    hf_data_config,
)

__all__ = ["KINDS", "Assumption", "Converted", "convert", "detect"]

KINDS = (
    "transformers:vit",
    "transformers:deit",
    "transformers:dinov2",
    "transformers:dinov2_with_registers",
    "transformers:clip",
    "transformers:siglip",
    "transformers:beit",
    "transformers:swin",
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
    "beit": "transformers:beit",
    "swin": "transformers:swin",
}


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
        "transformers:vit": convert_hf_vit,
        "transformers:deit": convert_hf_vit,
        "transformers:dinov2": convert_hf_dinov2,
        "transformers:dinov2_with_registers": convert_hf_dinov2,
        "transformers:clip": convert_hf_clip,
        "transformers:siglip": convert_hf_siglip,
        "transformers:beit": convert_hf_beit,
        "transformers:swin": convert_hf_swin,
        "open_clip": convert_open_clip,
        "dinov2_original": convert_dinov2_original,
    }
    if kind not in converters:
        raise VitdiagError(f"unknown checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}.")
    out = converters[kind](kind, dict(config or {}), dict(state_dict))
    if kind.startswith("transformers:"):
        relpos = kind in ("transformers:beit", "transformers:swin")
        data_config = relpos_data_config if relpos else hf_data_config
        out.data_config = data_config(kind, preprocessor, out.model_args, out.assumptions)
    check_loadable(kind, out)
    return out
