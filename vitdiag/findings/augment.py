"""augment.*: the guideline flags of the augment audit (arXiv 2405.14115), with the measured
variance ratio against the ratio 1 that a variance-preserving augmentation keeps."""

from __future__ import annotations

from vitdiag.findings.base import INFO, Context, Finding, finite, short

PROBE = "augment"
# flag -> (augmentation whose ratio shows it, the timm train.py change that removes it)
FLAGS = {
    "mixup": ("mixup", "timm train.py: --mixup 0 --cutmix 1.0"),
    "erasing-mode": ("erasing", "timm train.py: --remode pixel (with the data's own --mean/--std)"),
    "pixel-normalisation": ("erasing", "timm train.py: --mean/--std of the data itself"),
}


def _ratio(result: dict, augmentation: str) -> float | None:
    """The configured augmentation's variance ratio (X when measured, else the image)."""
    if augmentation == "erasing":
        config = (result.get("extra") or {}).get("config") or {}
        augmentation = f"erasing-{config.get('remode', 'pixel')}"
    metrics = result.get("metrics", {})
    for key in (f"ratio_x_global/{augmentation}", f"ratio_image_global/{augmentation}"):
        if finite(metrics.get(key)):
            return float(metrics[key])
    return None


def rules(result: dict, ctx: Context, overrides: dict | None = None) -> list[Finding]:
    m = result.get("metrics", {})
    why_of = {row[0]: row[1] for t in result.get("tables", []) for row in t.get("rows", [])}
    out = []
    for flag, (augmentation, remedy) in FLAGS.items():
        if m.get(f"flag/{flag}") != 1.0:
            continue
        ratio = _ratio(result, augmentation)
        ref = {
            "value": 1.0,
            "interval": None,
            "how": "a variance-preserving augmentation keeps Var(augmented)/Var(clean) at 1",
        }
        why = why_of.get(flag) or f"the {flag} guideline is not met"
        if ratio is not None:
            why = f"{why} (measured variance ratio {short(ratio)})"
        # No interval over images is kept for the ratios, so the finding stays descriptive.
        out.append(Finding(f"augment.{flag}", INFO, ratio, None, None, ref, why, remedy))
    return out
