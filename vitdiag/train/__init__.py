"""Training-time remedies (SPEC §9): DiversePatch losses and a fixed simplex-ETF classifier.

A library for a training loop; it imports nothing of the CLI (cli, commands, options, runner).

    from vitdiag.train import (forward_tokens, install_fixed_etf_head, patch_contrastive_loss,
                               patch_cosine_loss, patch_cutmix, patch_mixing_loss)
"""

from vitdiag.train.etf import head_modules, install_fixed_etf_head, simplex_etf
from vitdiag.train.losses import (
    PatchMix,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_cutmix,
    patch_mixing_loss,
    patchwise_abs_cosine_per_image,
)
from vitdiag.train.tokens import TokenForward, forward_tokens

__all__ = [
    "PatchMix",
    "TokenForward",
    "forward_tokens",
    "head_modules",
    "install_fixed_etf_head",
    "patch_contrastive_loss",
    "patch_cosine_loss",
    "patch_cutmix",
    "patch_mixing_loss",
    "patchwise_abs_cosine_per_image",
    "simplex_etf",
]
