"""The logits and the first and last layers' grid tokens from one training forward.

The layers are the family table's (`families.py`), read by the engine's own hooks, so a loss
sees the tokens vitdiag's similarity probe measures: `first` is layer 0 (`embed`, the input of
block 1: patch embedding + position), `last` the last block's output (`last_block`, before the
final norm). Unlike the probes, the forward keeps its graph: the losses backpropagate into it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from vitdiag.engine import LayerRecorder
from vitdiag.families import family_of


class TokenForward(NamedTuple):
    """logits: what model(images) returned. first, last: (B, n, D) float32 grid tokens of the
    first and last layers, prefix tokens removed, still attached to the graph."""

    logits: Any
    first: torch.Tensor
    last: torch.Tensor


def forward_tokens(model: nn.Module, images: torch.Tensor) -> TokenForward:
    """Run model(images) once and return its output with the first and last grid tokens.

    Works for every family in the table (ViT/DeiT, EVA, CaiT, BEiT, PiT, Swin, XCiT, ResNet);
    the contrastive loss needs equal n at both ends, which Swin, PiT and CNNs do not have (the
    paper leaves it out for Swin, §5.3). Give the model itself, not a DDP/compile wrapper: the
    hooks go on its submodules (a DDP wrapper's `.module` has them).
    """
    taps = family_of(model).layer_taps(model)
    blocks = [tap for tap in taps if tap.name != "norm"]
    first, last = blocks[0], blocks[-1]
    recorder = LayerRecorder(model, [first, last])
    try:
        logits = model(images)
        grids, _ = recorder.collect()
    finally:
        recorder.close()
    return TokenForward(logits, grids[first.name], grids[last.name])
