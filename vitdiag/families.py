"""The one table of per-family facts.

Every difference between model families that a probe or the loader cares about lives here:
which timm class a family is, how many prefix tokens it carries, where its absolute position
table lives and how it is laid out, and which modules to tap for per-layer tokens. Probes ask
this table; they never test architecture names themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Token layouts a tap can produce. The engine turns each into (grid tokens, prefix tokens).
NLC = "nlc"  # (B, prefix + n, D): prefix tokens first
NHWC = "nhwc"  # (B, H, W, D): Swin
NCHW = "nchw"  # (B, D, H, W): CNNs
PIT = "pit"  # (x (B, D, H, W), prefix (B, p, D)): PiT stages pass a tuple


@dataclass(frozen=True)
class LayerTap:
    """One place to read tokens: `module` path, its `input` or `output`, the layout there."""

    name: str
    module: str
    where: str  # "input" | "output"
    layout: str
    num_prefix: int = 0


@dataclass(frozen=True)
class Family:
    name: str
    label: str  # for people
    classes: tuple[str, ...]  # timm model class names that belong to this family
    arch_prefixes: tuple[str, ...]  # timm architecture names that belong here (for matching)
    layer_taps: Callable[[Any], list[LayerTap]]
    # Absolute position table: attribute name, layout ("nlc" | "nchw"), or None.
    pos_embed: str | None = None
    pos_layout: str = NLC
    # Does timm's checkpoint filter resample the table when a model is built at another size?
    timm_resamples_pos_embed: bool = False
    is_transformer: bool = True
    why_no_abs_pos: str = ""
    extra: dict = field(default_factory=dict)
    # State-dict keys that mark the family ('#' stands for a block index, '|' separates
    # alternatives). The loader uses them to pick which timm architectures to try.
    key_signature: tuple[str, ...] = ()
    # The class token's parameter; timm always puts it first among the prefix tokens
    # (class, then distillation/register). None: the family never has one.
    class_token: str | None = "cls_token"
    # Do the leading rows of the position table belong to the prefix tokens? CaiT adds
    # position to the grid only; its class token joins later.
    pos_rows_include_prefix: bool = True
    # Relative-position bias tables ('#' stands for a stage index). Their size follows the
    # attention window, so they can show the size the weights were trained at.
    rel_bias_keys: tuple[str, ...] = ()
    # How to read that size off them: (rel_bias_keys, state dict, model built on the meta
    # device) -> ((h, w), how it was read) or None.
    native_from_bias: Callable[[tuple[str, ...], dict, Any], Any] | None = None
    # Stages merge 2x2 patches (Swin), so a valid side is a multiple of patch x 2^merges.
    patch_merging: bool = False
    # When no registered architecture fits, may a plain timm class be read off the tensor
    # shapes? (ViT: patch size, width, depth and MLP ratio all show in the weights.)
    infer_from_shapes: bool = False


def _module(model: Any, path: str) -> Any:
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def _has_norm(model: Any, attr: str = "norm") -> bool:
    import torch.nn as nn

    m = getattr(model, attr, None)
    return m is not None and not isinstance(m, nn.Identity)


def _blocks_taps(
    model: Any, blocks: str, prefix: int, final_prefix: int | None = None
) -> list[LayerTap]:
    """Layer 0 is the input of the first block (patch embedding + position), then every block
    output, then the final norm when the model has one on the token sequence."""
    n = len(_module(model, blocks))
    taps = [LayerTap("embed", f"{blocks}.0", "input", NLC, prefix)]
    taps += [LayerTap(f"block{i + 1}", f"{blocks}.{i}", "output", NLC, prefix) for i in range(n)]
    if _has_norm(model):
        fp = prefix if final_prefix is None else final_prefix
        taps.append(LayerTap("norm", "norm", "output", NLC, fp))
    return taps


def num_prefix_tokens(model: Any) -> int:
    """Class, distillation and register tokens in the token sequence."""
    n = getattr(model, "num_prefix_tokens", None)
    if n is not None:
        return int(n)
    return 0


def class_token_row(model: Any) -> int | None:
    """Which prefix row of the token sequence is the class token; None when there is none.

    A ViT built with ``class_token=False`` and register tokens still has prefix rows, so
    "row 0 when there are prefix tokens" would silently read a register token.
    """
    from vitdiag.errors import VitdiagError

    try:
        attr = family_of(model).class_token
    except VitdiagError:
        attr = "cls_token"  # an unknown class: trust only timm's own attribute
    if attr is None or getattr(model, attr, None) is None:
        return None
    if getattr(model, "has_class_token", True) is False:
        return None
    return 0


def pos_prefix_rows(model: Any) -> int:
    """How many leading rows of `pos_embed` belong to prefix tokens rather than the grid."""
    fam = family_of(model)
    if fam.pos_embed is None or fam.pos_layout == NCHW:
        return 0
    if not fam.pos_rows_include_prefix:
        return 0
    if getattr(model, "no_embed_class", False):
        return 0
    return num_prefix_tokens(model)


def _vit_taps(model: Any) -> list[LayerTap]:
    return _blocks_taps(model, "blocks", num_prefix_tokens(model))


def _cait_taps(model: Any) -> list[LayerTap]:
    # Patch blocks see the grid only; the class token is attached in blocks_token_only.
    return _blocks_taps(model, "blocks", 0, final_prefix=1)


def _xcit_taps(model: Any) -> list[LayerTap]:
    return _blocks_taps(model, "blocks", 0, final_prefix=1)


def _pit_taps(model: Any) -> list[LayerTap]:
    n_cls = int(model.cls_token.shape[1])
    n = len(model.transformers)
    taps = [LayerTap("embed", "transformers.0", "input", PIT, n_cls)]
    for s in range(n):
        for b in range(len(model.transformers[s].blocks)):
            taps.append(
                LayerTap(
                    f"stage{s + 1}.block{b + 1}",
                    f"transformers.{s}.blocks.{b}",
                    "output",
                    NLC,
                    n_cls,
                )
            )
    return taps


def _swin_taps(model: Any) -> list[LayerTap]:
    n = len(model.layers)
    taps = [LayerTap("embed", "layers.0", "input", NHWC)]
    taps += [LayerTap(f"merge{i}", f"layers.{i}", "input", NHWC) for i in range(1, n)]
    taps.append(LayerTap(f"stage{n}", f"layers.{n - 1}", "output", NHWC))
    if _has_norm(model):
        taps.append(LayerTap("norm", "norm", "output", NHWC))
    return taps


def _resnet_taps(model: Any) -> list[LayerTap]:
    # Inputs of every stride-2 stage, then the last stage's output: every position is a token.
    taps = [LayerTap("stem", "layer1", "input", NCHW)]
    taps += [LayerTap(f"layer{i}.in", f"layer{i}", "input", NCHW) for i in (2, 3, 4)]
    taps.append(LayerTap("layer4.out", "layer4", "output", NCHW))
    return taps


def _native_from_window_bias(keys: tuple[str, ...], sd: dict, meta: Any) -> Any:
    """BEiT: the bias table spans the attention window, which is the whole grid. It has
    (2w - 1)^2 rows for relative offsets plus 3 for the class token's."""
    key = next((k for k in keys if k in sd), None)
    if key is None:
        return None
    n = int(sd[key].shape[0]) - 3
    w = math.isqrt(n)
    if w * w == n and w % 2 == 1:
        g = (w + 1) // 2
        ps = meta.patch_embed.patch_size
        return (g * ps[0], g * ps[1]), (
            f"inferred from the relative position bias table ({g}x{g} window)"
        )
    return None


def _native_from_clipped_windows(keys: tuple[str, ...], sd: dict, meta: Any) -> Any:
    """Swin: timm clips a stage's window to its feature map, so a clipped window gives the
    size away."""
    ps = meta.patch_embed.patch_size
    # The meta model is built at the default size, where the first stage is never clipped.
    target = max(max(st.blocks[0].window_size) for st in meta.layers)
    for i in range(len(meta.layers)):
        t = sd.get(keys[0].replace("#", str(i)))
        if t is None:
            return None
        w = (math.isqrt(int(t.shape[0])) + 1) // 2
        if w < target:
            scale = 2**i
            hw = (w * ps[0] * scale, w * ps[1] * scale)
            return hw, f"inferred from the clipped {w}x{w} attention window of stage {i + 1}"
    return None


_NO_TABLE_REL = (
    "it has no absolute position table (position enters through relative biases in attention)"
)
_NO_TABLE_FOURIER = "its positions come from a fixed Fourier encoding, not a learned table"
_NO_TABLE_CNN = "it is a CNN and has no position embedding"

FAMILIES: tuple[Family, ...] = (
    Family(
        "vit",
        "ViT / DeiT / DeiT-III / FlexiViT / registers",
        ("VisionTransformer", "VisionTransformerDistilled"),
        ("vit_", "deit_", "deit3_", "flexivit_"),
        _vit_taps,
        pos_embed="pos_embed",
        timm_resamples_pos_embed=True,
        infer_from_shapes=True,
        key_signature=(
            "patch_embed.proj.weight",
            "blocks.#.attn.qkv.weight",
            "blocks.#.norm1.weight",
        ),
    ),
    Family(
        "eva",
        "EVA / EVA-02",
        ("Eva",),
        ("eva02_", "eva_"),
        _vit_taps,
        pos_embed="pos_embed",
        timm_resamples_pos_embed=True,
        key_signature=(
            "patch_embed.proj.weight",
            "blocks.#.norm1.weight",
            "blocks.#.attn.q_bias|blocks.#.attn.q_proj.weight",
            "pos_embed",
        ),
    ),
    Family(
        "cait",
        "CaiT",
        ("Cait",),
        ("cait_",),
        _cait_taps,
        pos_embed="pos_embed",
        pos_rows_include_prefix=False,
        key_signature=(
            "patch_embed.proj.weight",
            "blocks.#.attn.qkv.weight",
            "blocks.#.norm1.weight",
            "blocks_token_only.#.attn.q.weight",
        ),
    ),
    Family(
        "pit",
        "PiT",
        ("PoolingVisionTransformer",),
        ("pit_",),
        _pit_taps,
        pos_embed="pos_embed",
        pos_layout=NCHW,
        key_signature=("patch_embed.conv.weight", "transformers.#.blocks.#.attn.qkv.weight"),
    ),
    Family(
        "beit",
        "BEiT",
        ("Beit",),
        ("beit_", "beitv2_"),
        _vit_taps,
        why_no_abs_pos=_NO_TABLE_REL,
        rel_bias_keys=(
            "blocks.0.attn.relative_position_bias_table",
            "rel_pos_bias.relative_position_bias_table",
        ),
        native_from_bias=_native_from_window_bias,
        key_signature=(
            "patch_embed.proj.weight",
            "blocks.#.norm1.weight",
            "blocks.#.attn.qkv.weight",
            "blocks.#.attn.q_bias|blocks.#.gamma_1",
            "blocks.#.attn.relative_position_bias_table|rel_pos_bias.relative_position_bias_table",
        ),
    ),
    Family(
        "swin",
        "Swin",
        ("SwinTransformer",),
        ("swin_",),
        _swin_taps,
        why_no_abs_pos=_NO_TABLE_REL,
        class_token=None,
        rel_bias_keys=("layers.#.blocks.0.attn.relative_position_bias_table",),
        native_from_bias=_native_from_clipped_windows,
        patch_merging=True,
        key_signature=(
            "patch_embed.proj.weight",
            "layers.#.blocks.#.attn.relative_position_bias_table",
        ),
    ),
    Family(
        "xcit",
        "XCiT",
        ("Xcit",),
        ("xcit_",),
        _xcit_taps,
        why_no_abs_pos=_NO_TABLE_FOURIER,
        key_signature=(
            "blocks.#.attn.qkv.weight",
            "blocks.#.norm1.weight",
            "blocks.#.attn.temperature",
            "cls_attn_blocks.#.attn.q.weight",
        ),
    ),
    Family(
        "resnet",
        "ResNet (CNN reference)",
        ("ResNet",),
        ("resnet", "resnext", "wide_resnet"),
        _resnet_taps,
        is_transformer=False,
        class_token=None,
        why_no_abs_pos=_NO_TABLE_CNN,
        key_signature=("conv1.weight", "layer1.#.conv1.weight", "layer4.#.conv1.weight"),
    ),
)


def family_of(model: Any) -> Family:
    """The family of a built model, by its class."""
    from vitdiag.errors import VitdiagError

    cls = type(model).__name__
    for fam in FAMILIES:
        if cls in fam.classes:
            return fam
    supported = ", ".join(f.label for f in FAMILIES)
    raise VitdiagError(
        f"vitdiag does not know the model class {cls}; supported families: {supported}."
    )


def families_for_keys(keys: Any) -> list[Family]:
    """Families whose key signature a state dict carries, the most specific signature first."""
    import re

    keys = list(keys)
    found = []
    for fam in FAMILIES:
        if not fam.key_signature:
            continue
        for pattern in fam.key_signature:
            alts = [re.escape(a).replace("\\#", r"\d+") for a in pattern.split("|")]
            rx = re.compile("^(?:" + "|".join(alts) + ")$")
            if not any(rx.match(k) for k in keys):
                break
        else:
            found.append(fam)
    return sorted(found, key=lambda f: -len(f.key_signature))


def has_abs_pos_table(model: Any) -> bool:
    fam = family_of(model)
    return fam.pos_embed is not None and getattr(model, fam.pos_embed, None) is not None


def module_at(model: Any, path: str) -> Any:
    """The submodule at a dotted path (digits index into sequences)."""
    return _module(model, path)
