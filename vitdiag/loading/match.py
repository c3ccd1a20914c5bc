"""What the tensors alone show: which timm architectures fit a state dict's shapes, and the
image size the weights were trained at.

Candidates are built on the meta device (no memory, no init) and compared key by key. Head
count and LayerNorm eps leave no trace in the shapes, so when several architectures fit, the
canonical one is picked and the choice recorded as an `Assumption`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import timm

from vitdiag.errors import VitdiagError
from vitdiag.families import FAMILIES, NCHW, Family, families_for_keys, family_of, pos_prefix_rows
from vitdiag.loading.build import default_size, fixed_input_size
from vitdiag.loading.common import fmt_kwargs, freeze, one_line, plain
from vitdiag.loading.spec import Assumption
from vitdiag.loading.timm_internals import meta_device, recipes

# Arguments a plain VisionTransformer is fully described by once shapes fix the rest.
_PLAIN_VIT_ARGS = {"patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias"}
_VIT_BASE = "vit_base_patch16_224"
_HEADS = {"num_heads", "head_dim", "scale"}
# Attributes that follow the build size, initialisation or runtime switches: two models that
# differ only in these compute the same function of the same weights.
_NOT_COMPUTE = {
    "training",
    "fused_attn",
    "grad_checkpointing",
    "img_size",
    "num_patches",
    "grid_size",
    "feat_size",
    "init_values",
    "init_scale",
    "head_init_scale",
    "weight_init",
    "fix_init",
}
_META_CACHE: dict[tuple, tuple[dict, dict, Any]] = {}
_META_CACHE_MAX = 512


# --------------------------------------------------------------------------- meta models


def _meta_model(arch: str, kwargs: dict, size: tuple[int, int] | None) -> Any:
    kw = dict(kwargs)
    if size is not None and fixed_input_size(arch):
        kw["img_size"] = size
    with meta_device():
        try:
            return timm.create_model(arch, pretrained=False, **kw)
        except Exception as e:
            raise VitdiagError(
                f"timm cannot build {arch} with {fmt_kwargs(kw)} ({one_line(e)}); "
                "check --arch and --model-arg."
            ) from None


def shapes_and_print(arch: str, kwargs: dict, size: tuple[int, int] | None):
    """Key -> shape, a fingerprint of everything shapes do not show, and the meta model."""
    key = (arch, freeze(kwargs), size)
    if key not in _META_CACHE:
        if len(_META_CACHE) >= _META_CACHE_MAX:  # meta models are small, but not free
            _META_CACHE.clear()
        m = _meta_model(arch, kwargs, size)
        shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        _META_CACHE[key] = (shapes, _fingerprint(m), m)
    return _META_CACHE[key]


def _fingerprint(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        tname = type(m).__name__
        if "Drop" in tname or tname == "Identity":
            continue
        out[f"{name}:type"] = tname
        for k, v in vars(m).items():
            if k.startswith("_") or k in _NOT_COMPUTE or "drop" in k:
                continue
            if plain(v) and not isinstance(v, dict):
                out[f"{name}.{k}"] = v
    return out


def _mismatches(shapes: dict, sd: dict) -> list[str]:
    out = []
    for k, s in shapes.items():
        if k not in sd:
            out.append(f"{k} missing")
        elif tuple(sd[k].shape) != s:
            out.append(f"{k} {tuple(sd[k].shape)} vs {s}")
    out += [f"{k} unexpected" for k in sd if k not in shapes]
    return out


# --------------------------------------------------------------------------- what weights show


def num_classes(arch: str, sd: dict, kwargs: dict, cfg: dict | None) -> int:
    """The class count the weights were trained for: the head's rows when the head is in the
    file (so the trained head is kept), else what config/model args say, else no head."""
    if kwargs.get("num_classes") is not None:
        return int(kwargs["num_classes"])
    for c in _classifier_keys(arch):
        w = sd.get(f"{c}.weight")
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    if cfg is not None and cfg.get("num_classes") is not None:
        return int(cfg["num_classes"])
    return 0


def _classifier_keys(arch: str) -> tuple[str, ...]:
    cfg = timm.models.get_pretrained_cfg(arch)
    names = (cfg.classifier if cfg is not None else None) or "head"
    return (names,) if isinstance(names, str) else tuple(names)


def native_from_weights(sd: dict, meta: Any) -> tuple[tuple[int, int] | None, str] | None:
    """The size the weights were trained at, where the tensors show it.

    Returns (size, how) when they do, (None, why not) when a table exists but fits no square
    grid, and None when nothing in the weights depends on the size.
    """
    fam = family_of(meta)
    pe = getattr(meta, "patch_embed", None)
    if fam.pos_embed and fam.pos_embed in sd and getattr(meta, fam.pos_embed, None) is not None:
        v = sd[fam.pos_embed]
        if fam.pos_layout == NCHW and v.ndim == 4:
            conv = pe.conv
            k, s, p = conv.kernel_size, conv.stride, conv.padding
            hw = tuple((n - 1) * s[i] + k[i] - 2 * p[i] for i, n in enumerate(v.shape[-2:]))
            return hw, f"inferred from pos_embed shape {tuple(v.shape)} (channels-first grid)"
        if v.ndim == 3 and pe is not None:
            n = int(v.shape[1]) - pos_prefix_rows(meta)
            g = math.isqrt(max(n, 0))
            if n > 0 and g * g == n:
                ps = pe.patch_size
                return (g * ps[0], g * ps[1]), (
                    f"inferred from pos_embed shape {tuple(v.shape)} ({g}x{g} grid of "
                    f"{ps[0]}-pixel patches)"
                )
            return None, f"its pos_embed has {n} grid rows, which no square grid fits"
    if fam.native_from_bias is not None and pe is not None:
        return fam.native_from_bias(fam.rel_bias_keys, sd, meta)
    return None


# --------------------------------------------------------------------------- matching


@dataclass
class Choice:
    """An architecture, its arguments, how it was chosen, and where its head count (which
    the weights cannot show) comes from."""

    arch: str
    kwargs: dict
    decided_by: str
    assumptions: list[Assumption]
    hidden_source: str


def match(sd: dict, extra: dict, size: tuple[int, int] | None, where: str) -> Choice:
    """The timm architecture whose tensors fit `sd` exactly, trying the families whose key
    signature the weights carry; `extra` are the user's model args."""
    fams = families_for_keys(sd)
    if not fams:
        labels = ", ".join(f.label for f in FAMILIES)
        raise VitdiagError(
            f"{where}: the tensor names fit none of the families vitdiag knows ({labels}); "
            "pass --arch NAME if timm can build it."
        )
    facts = _sd_facts(sd)
    closest: list[tuple[int, str]] = []
    for fam in fams:
        fits, tried = _fits_in(fam, sd, extra, size, facts, closest)
        if fits:
            return _pick(fits, fam, tried, size or _first_native(sd, fits), where)
        if fam.infer_from_shapes:
            inferred = _infer_vit(sd, extra, size)
            if inferred is not None:
                return inferred
    if not closest:
        # Nothing survived the cheap filter: rank a few by how far their numbers are off.
        closest = _rank_by_facts(fams[0], facts, sd, extra, size)
    closest.sort()
    shown = ", ".join(f"{n} ({k} tensors differ)" for k, n in closest[:3])
    raise VitdiagError(
        f"{where}: the weights fit no timm {fams[0].label} architecture (closest: {shown}); "
        "pass --arch NAME and --model-arg KEY=VALUE for the settings that differ."
    )


def _fits_in(
    fam: Family, sd: dict, extra: dict, size: Any, facts: dict, closest: list
) -> tuple[list[tuple[str, dict, dict]], int]:
    """The family's architectures whose shapes all fit, and how many were built to see;
    near misses are added to `closest` as (tensors that differ, name)."""
    names = _candidates(fam)
    recs = recipes(names)
    tried = 0
    fits: list[tuple[str, dict, dict]] = []
    for name in names:
        r = recs.get(name)
        # What the user passes as model args replaces the entrypoint's own value.
        if r is not None and (r[0] not in fam.classes or not _could_fit({**r[1], **extra}, facts)):
            continue
        tried += 1
        kw = dict(extra)
        kw["num_classes"] = num_classes(name, sd, kw, None)
        try:
            shapes, fp, meta = shapes_and_print(name, kw, None)
            seen = native_from_weights(sd, meta)
            # What the table shows wins here; a contradicting --native-size is reported
            # once the architecture is known.
            native = (seen[0] if seen and seen[0] else None) or size
            if native is not None and fixed_input_size(name):
                shapes, fp, meta = shapes_and_print(name, kw, native)
        except VitdiagError:
            continue
        bad = _mismatches(shapes, sd)
        if not bad:
            fits.append((name, kw, fp))
        else:
            closest.append((len(bad), name))
    return fits, tried


def _sd_facts(sd: dict) -> dict[str, Any]:
    """Size-independent numbers a state dict shows, to rule candidates out cheaply."""

    def counts(rx: str) -> tuple[int, ...]:
        found: dict[int, set] = {}
        for k in sd:
            mm = re.match(rx, k)
            if mm:
                g = mm.groups()
                found.setdefault(int(g[0]) if len(g) > 1 else 0, set()).add(int(g[-1]))
        return tuple(len(found[i]) for i in sorted(found))

    facts: dict[str, Any] = {}
    blocks = counts(r"^blocks\.(\d+)\.")
    if blocks:
        facts["depth"] = blocks[0]
    stages = counts(r"^transformers\.(\d+)\.blocks\.(\d+)\.")
    if stages:
        facts["depth"] = stages
    per_stage = counts(r"^layers\.(\d+)\.blocks\.(\d+)\.")
    if per_stage:
        facts["depths"] = per_stage
    res = counts(r"^layer(\d)\.(\d+)\.")
    if res:
        facts["layers"] = res
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        facts["embed_dim"] = int(w.shape[0])
        facts["patch_size"] = int(w.shape[-1])
    return facts


def _could_fit(kw: dict, facts: dict) -> bool:
    for k, v in facts.items():
        c = kw.get(k)
        if c is None:
            continue
        if isinstance(v, tuple) and isinstance(c, (list, tuple)):
            if tuple(c) != v:
                return False
        elif isinstance(v, int) and isinstance(c, int) and not isinstance(c, bool) and c != v:
            return False
    return True


def _candidates(fam: Family) -> list[str]:
    names: set[str] = set()
    for p in fam.arch_prefixes:
        names.update(timm.list_models(f"{p}*"))
    return sorted(names)


def _first_native(sd: dict, fits: list) -> tuple[int, int] | None:
    name, kw, _ = fits[0]
    seen = native_from_weights(sd, shapes_and_print(name, kw, None)[2])
    return seen[0] if seen and seen[0] else None


def _rank_by_facts(fam, facts, sd, extra, size) -> list[tuple[int, str]]:
    names = _candidates(fam)
    recs = recipes(names)

    def off(name: str) -> int:
        r = recs.get(name)
        if r is None or r[0] not in fam.classes:
            return 99
        return sum(1 for k in facts if r[1].get(k) is not None and r[1].get(k) != facts[k])

    ranked = sorted(names, key=lambda n: (off(n), len(n), n))[:5]
    out = []
    for name in ranked:
        kw = dict(extra)
        kw["num_classes"] = num_classes(name, sd, kw, None)
        try:
            shapes, _, _ = shapes_and_print(name, kw, size)
        except VitdiagError:
            continue
        out.append((len(_mismatches(shapes, sd)), name))
    return out


def _pick(
    fits: list[tuple[str, dict, dict]], fam: Family, tried: int, native_hint: Any, where: str
) -> Choice:
    """One architecture among those whose shapes all fit: the canonical one when they differ
    only in what shapes cannot show (head count, LayerNorm eps), else an error."""

    def canon(item):
        name = item[0]
        same_size = native_hint is not None and default_size(name) == tuple(native_hint)
        return (not same_size, len(name), name)

    fits = sorted(fits, key=canon)
    name, kw, fp = fits[0]
    others = [f[0] for f in fits[1:]]
    if not others:
        return Choice(
            name,
            kw,
            f"matched the tensor shapes against {tried} timm {fam.label} architectures; "
            f"only {name} fits",
            [],
            f"timm default for {name}",
        )
    heads_differ, eps_differ, other_differ = _differences(fp, fits[1:])
    if other_differ:
        shown = ", ".join([name, *dict.fromkeys(other_differ)][:4])
        raise VitdiagError(
            f"{where}: the weights fit several timm architectures that compute differently "
            f"({shown}); pass --arch NAME to say which."
        )
    shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
    assumptions = [
        Assumption(
            "architecture",
            name,
            f"{len(fits)} architectures fit the tensor shapes exactly ({name}, {shown}); "
            "picked the canonical one",
            "--arch",
        )
    ]
    hidden = f"timm default for {name}"
    if heads_differ:
        hidden += f" (fitting alternatives differ: {', '.join(dict.fromkeys(heads_differ))})"
    decided = (
        f"matched the tensor shapes against {tried} timm {fam.label} architectures; "
        f"{len(fits)} fit with identical shapes and {name} was picked as the canonical one"
    )
    if eps_differ:
        assumptions.append(
            Assumption(
                "layer_norm_eps alternatives",
                ", ".join(dict.fromkeys(eps_differ)),
                "these fitting architectures use another LayerNorm eps",
                "--arch",
            )
        )
    return Choice(name, kw, decided, assumptions, hidden)


def _differences(fp: dict, others: list) -> tuple[list[str], list[str], list[str]]:
    """Which fitting alternatives differ from the pick in head count, in LayerNorm eps, or
    in anything else (then they compute differently)."""
    heads_differ: list[str] = []
    eps_differ: list[str] = []
    other_differ: list[str] = []
    for oname, _, ofp in others:
        for k in set(fp) | set(ofp):
            if fp.get(k) == ofp.get(k):
                continue
            attr = k.rsplit(".", 1)[-1]
            if attr in _HEADS:
                heads_differ.append(oname)
            elif attr == "eps":
                eps_differ.append(oname)
            else:
                other_differ.append(oname)
                break
    return heads_differ, eps_differ, other_differ


# --------------------------------------------------------------------------- a plain ViT


def _infer_vit(sd: dict, extra: dict, size: tuple[int, int] | None) -> Choice | None:
    """A plain VisionTransformer whose arguments are read off the tensor shapes."""
    w = sd.get("patch_embed.proj.weight")
    pos = sd.get("pos_embed")
    if w is None or w.ndim != 4 or "dist_token" in sd:
        return None
    embed, in_chans, ph, pw = (int(x) for x in w.shape)
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))}
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if not blocks or fc1 is None:
        return None
    kw = _vit_args(sd, embed, in_chans, ph, pw, max(blocks) + 1, fc1.shape[0] / embed)
    grid = None
    if pos is not None and pos.ndim == 3:
        grid = _vit_grid(kw, int(pos.shape[1]), ph, pw, size)
    elif pos is None:
        kw["pos_embed"] = "none"
    if grid is None and pos is not None:
        return None
    base, base_heads = _vit_base(embed, ph)
    kw["num_heads"] = base_heads or _heads_for(embed)
    kw.update(extra)
    try:
        shapes, _, _ = shapes_and_print(base, kw, grid)
    except VitdiagError:
        return None
    if _mismatches(shapes, sd):
        return None
    how = (
        f"head count of timm's {base}, which has the same width (heads are invisible in "
        "the weights)"
        if base_heads
        else "assumed embed_dim // 64 (heads are invisible in the weights)"
    )
    if "num_heads" in extra:
        how = "--model-arg num_heads"
    return Choice(
        base,
        kw,
        "no registered timm architecture fits; inferred a VisionTransformer from the tensor "
        f"shapes and built it as {base} with model_args {fmt_kwargs(kw)}",
        [],
        how,
    )


def _vit_args(
    sd: dict, embed: int, in_chans: int, ph: int, pw: int, depth: int, mlp_ratio: float
) -> dict[str, Any]:
    """VisionTransformer arguments that show in the tensor names and shapes."""
    kw: dict[str, Any] = {
        "patch_size": ph if ph == pw else (ph, pw),
        "embed_dim": embed,
        "depth": depth,
        "mlp_ratio": mlp_ratio,
        "in_chans": in_chans,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "class_token": "cls_token" in sd,
        "reg_tokens": int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0,
    }
    if "head.weight" in sd:
        kw["num_classes"] = int(sd["head.weight"].shape[0])
    else:
        kw["num_classes"] = 0
    if "blocks.0.ls1.gamma" in sd:
        kw["init_values"] = 1e-5  # any value: the trained scales are loaded over it
    if "norm_pre.weight" in sd:
        kw["pre_norm"] = True
    if "blocks.0.attn.q_norm.weight" in sd:
        kw["qk_norm"] = True
    if "fc_norm.weight" in sd:
        kw["global_pool"], kw["fc_norm"] = "avg", True
    elif not kw["class_token"]:
        kw["global_pool"], kw["fc_norm"] = "avg", False
    return kw


def _vit_grid(kw: dict, n: int, ph: int, pw: int, size: Any) -> tuple[int, int] | None:
    """The size a table of `n` rows was trained for, deciding `no_embed_class` on the way
    (whether the prefix tokens have rows of their own)."""
    prefix = int(kw["class_token"]) + kw["reg_tokens"]
    if size is not None:
        g = (size[0] // ph) * (size[1] // pw)
        kw["no_embed_class"] = n == g
        return size
    for no_embed, rows in ((False, n - prefix), (True, n)):
        g = math.isqrt(max(rows, 0))
        if rows > 0 and g * g == rows:
            kw["no_embed_class"] = no_embed
            return (g * ph, g * pw)
    return None


def _vit_base(embed: int, patch: int) -> tuple[str, int | None]:
    """A registered plain ViT to carry inferred arguments: one of the same width when there is
    one (its head count is then the best guess), else vit_base_patch16_224."""
    names = timm.list_models("vit_*")
    recs = recipes(names)
    same = []
    for n in names:
        r = recs.get(n)
        if r is None or r[0] != "VisionTransformer" or not set(r[1]) <= _PLAIN_VIT_ARGS:
            continue
        if r[1].get("embed_dim") == embed and "num_heads" in r[1]:
            same.append((r[1].get("patch_size") != patch, len(n), n, r[1]["num_heads"]))
    if same:
        same.sort()
        return same[0][2], int(same[0][3])
    return _VIT_BASE, None


def _heads_for(embed: int) -> int:
    h = max(1, embed // 64)
    while embed % h:
        h -= 1
    return h
