"""Variance shift between patch and position embeddings at other test sizes (SPEC §1, 2405.14115).

For a test size s and the native size s0:

- X_s = ``patch_embed(img_s)`` (bias included), grid tokens; its variance is streamed as float64
  sums (Σx, Σx², entry count; Σ over tokens of the per-token variance, token count), so it
  reduces across processes by addition;
- P_s = the grid rows of the native table resampled to the grid of s by timm's
  ``resample_abs_pos_embed`` (see ``vitdiag.posembed``);
- r(s) = Var[X_s] / Var[P_s], shift = r/r0, k̂ = r0/r, and c = 1/√k̂ restores r0;
- with labels, top-1 and NLL under each rescale of the table, and for the paired gain of a
  rescale over none (FINDINGS.md) B Poisson-bootstrap replicate sums Σw·correct and Σw: the
  weights are a pure function of (seed, global image index, replicate), so two passes over the
  same images weight them alike and the gain's interval is replicate-wise, with nothing kept
  per image.

The streaming part lives here: a probe that sums X's variance at one size and measures
accuracy under each table rescale of one pass. The study over sizes, which arranges the
passes, is `vitdiag.size_sweep`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.families import NCHW, family_of
from vitdiag.intervals import REPLICATES, poisson_weights
from vitdiag.posembed import (
    as_hw,
    require_abs_pos,
    rescale_factor,
    swapped_table,
    target_table,
)
from vitdiag.probes.base import EVAL, LOGITS, PATCH, Probe, Taps, global_indices
from vitdiag.results import Result

DEFINITION = "variance-shift-v1"
DEFINITION_DETAIL = (
    "2405.14115 as specified in vitdiag SPEC §1: variances with ddof=0; X = patch_embed(image) "
    "grid tokens, bias included; P = grid rows of pos_embed resampled by timm "
    "resample_abs_pos_embed (antialias for bilinear/bicubic, none for nearest); "
    "global = over all entries, per-token = across D channels of each token, averaged; "
    "r = Var X / Var P, shift = r/r0, khat = r0/r, c = 1/sqrt(khat)"
)


# ---------------------------------------------------------------------------------------------
# math on tensors


def patch_tokens(model: Any, images: torch.Tensor) -> torch.Tensor:
    """X = patch_embed(images) as (B, n, D) grid tokens, whatever layout the family uses."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        raise VitdiagError(
            f"{type(model).__name__} has no patch_embed module, so its patch embedding cannot "
            "be measured."
        )
    return as_grid_tokens(model, embed(images))


def as_grid_tokens(model: Any, x: Any) -> torch.Tensor:
    """What patch_embed returned, as (B, n, D) grid tokens, whatever layout the family uses."""
    embed = model.patch_embed
    if isinstance(x, (tuple, list)):
        x = x[0]
    if x.ndim == 3:
        return x
    if x.ndim != 4:
        raise ValueError(f"unexpected patch embedding shape {tuple(x.shape)}")
    fmt = str(getattr(getattr(embed, "output_fmt", None), "value", "")).upper()
    if fmt == "NHWC" or (fmt != "NCHW" and family_of(model).pos_layout != NCHW):
        return x.flatten(1, 2)
    return x.flatten(2).transpose(1, 2)


def variance_sums(x: torch.Tensor) -> torch.Tensor:
    """[Σx, Σx², n entries, Σ per-token variance, n tokens] of (B, n, D) tokens, float64 on CPU."""
    if x.device.type == "mps":  # MPS has no float64
        x = x.cpu()
    x = x.detach().to(torch.float64)
    d = x.shape[-1]
    tokens = x.numel() // d
    per_token = x.var(dim=-1, unbiased=False).sum()
    return torch.stack(
        [
            x.sum(),
            x.pow(2).sum(),
            torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
            per_token,
            torch.tensor(float(tokens), dtype=torch.float64, device=x.device),
        ]
    ).cpu()


def variances_from_sums(s: torch.Tensor) -> dict[str, float]:
    total, sq, n, tok_var, n_tok = (float(v) for v in s)
    if n == 0:
        return {"global": math.nan, "per_token": math.nan}
    mean = total / n
    return {"global": max(sq / n - mean * mean, 0.0), "per_token": tok_var / n_tok}


# ---------------------------------------------------------------------------------------------
# the probe


@dataclass
class RescaleGroup:
    """Rescales that share one factor c and hence one forward; table None = the engine's own."""

    names: list[str]
    c: float
    table: torch.Tensor | None = None


class VarianceShiftProbe(Probe):
    """X's variance sums at one size, and accuracy under each group of table rescales."""

    name = "variance"
    title = "Variance shift (patch vs position embedding)"
    order = 3
    split = EVAL
    # The shift at the native size is 1 by definition: the report leaves those rows out.
    headlines = ("r0", r"shift@[^/]+|top1@.+/(none|empirical)")
    headline_rank = 7
    check_metrics = (
        "shift[_global]@<size>",
        "r0[_global]",
        "r[_global]@<size>",
        "khat[_global]@<size>",
        "c[_global]@<size>",
        "var_x[_global]@<size>",
        "var_p[_global]@<size>",
        "shift[_global]@<size>/<interp>",
        "var_p[_global]@<size>/<interp>",
        "top1@<size>/<rescale>",
        "nll@<size>/<rescale>",
        "c@<size>/<rescale>",
        "gain@<size>/<rescale>",
    )

    @classmethod
    def applies(cls, loaded: Any) -> str | None:
        try:
            require_abs_pos(loaded.model, "the variance-shift probe")
        except VitdiagError as e:
            return str(e)
        return None

    @classmethod
    def build(cls, loaded: Any, settings: Any, transform: Any) -> VarianceShiftProbe:
        """The native-size probe of the shared pass: X's sums, and accuracy under each fixed
        rescale of the table (the empirical one needs its own pass). Only the native size
        shares a pass (other sizes are `vitdiag.size_sweep`'s own passes), so `loaded`
        is the native model and its table is the source of every rescaled one."""
        if as_hw(loaded.img_size) != as_hw(loaded.native_size):  # pragma: no cover - runner bug
            raise ValueError("the variance probe shares a pass only at the native size")
        groups = fixed_groups(
            settings.rescales,
            tuple(loaded.img_size),
            tuple(loaded.native_size),
            loaded.model,
            loaded.model,
            settings.table_interpolations[0],
        )
        return cls(groups, measure_x=True, accuracy=True)

    def __init__(
        self,
        groups: Sequence[RescaleGroup] = (),
        *,
        measure_x: bool = True,
        accuracy: bool = True,
    ) -> None:
        super().__init__()
        self.groups = list(groups)
        self.measure_x = measure_x
        self.accuracy = accuracy and bool(self.groups)
        self.needs = frozenset({LOGITS} if self.accuracy else ()) | (
            {PATCH} if measure_x else set()
        )
        self.add_sum_state("x_sums", (5,))
        self.add_sum_state("n_labelled")
        # per group: [correct, Σ NLL]
        self.add_sum_state("acc_sums", (max(1, len(self.groups)), 2))
        # The bootstrap of top-1 (FINDINGS.md): per group Σ_i w[i, r]·correct_i, and Σ_i w[i, r]
        # over the labelled images, r = 1..B. Integer-valued float64 sums, so exact in any order.
        self.add_sum_state("boot_correct", (max(1, len(self.groups)), REPLICATES))
        self.add_sum_state("boot_weight", (REPLICATES,))
        # McNemar's discordant counts of each group against group 0 (the engine's own forward,
        # c = 1 in pass A): [right only with the group, right only with group 0]. Streaming
        # because both forwards see the same batch; a rescale measured in another pass (pass B,
        # the empirical one) has no partner here.
        self.add_sum_state("discordant", (max(1, len(self.groups)), 2))
        self._seen = 0  # images handed so far, for global indices outside the engine

    def update(self, taps: Taps) -> None:
        ctx = taps.context
        model = ctx.model
        index = global_indices(taps, self._seen)
        self._seen += int(taps.images.shape[0])
        if self.measure_x:
            with torch.inference_mode(), ctx.autocast():
                if taps.patch is not None:  # captured from the forward by the engine
                    x = as_grid_tokens(model, taps.patch)
                else:
                    x = patch_tokens(model, taps.images)
            self.x_sums += variance_sums(x)
        if not self.accuracy:
            return
        mask = taps.labelled
        if not bool(mask.any()):
            return
        y = taps.targets[mask]
        self.n_labelled += float(y.numel())
        # The engine's seed is the run's (settings.seed): every pass of a run draws alike.
        w = poisson_weights(int(getattr(ctx, "seed", 0)), index[mask.cpu()])
        self.boot_weight += w.sum(dim=0)
        first = None
        for i, group in enumerate(self.groups):
            if group.table is None:
                logits = taps.logits
            else:
                with swapped_table(model, group.table):
                    logits = ctx.forward(taps.images)[2]
            sums, correct = _accuracy_sums(logits[mask], y)
            self.acc_sums[i] += sums
            self.boot_correct[i] += correct.double() @ w
            first = correct if first is None else first
            self.discordant[i] += torch.stack(
                [(correct & ~first).sum(), (~correct & first).sum()]
            ).double()

    def compute(self) -> Result:
        # The study assembles one Result from several passes; this one is for direct use.
        metrics = {f"var_x_{k}": v for k, v in variances_from_sums(self.x_sums).items()}
        n = float(self.n_labelled)
        for i, group in enumerate(self.groups):
            for name in group.names:
                metrics[f"top1/{name}"] = float(self.acc_sums[i, 0]) / n if n else math.nan
                metrics[f"nll/{name}"] = float(self.acc_sums[i, 1]) / n if n else math.nan
        return Result(probe="variance", definition=DEFINITION, metrics=metrics)

    def accuracy_by_name(self) -> dict[str, dict[str, float]]:
        n = float(self.n_labelled)
        out = {}
        for i, group in enumerate(self.groups):
            for name in group.names:
                out[name] = {
                    "c": group.c,
                    "top1": float(self.acc_sums[i, 0]) / n if n else math.nan,
                    "nll": float(self.acc_sums[i, 1]) / n if n else math.nan,
                    "n_labelled": n,
                }
        return out

    def bootstrap_by_name(self) -> dict[str, dict[str, Any]]:
        """rescale -> its B replicate sums Σw·correct ("correct"), Σw ("weight"), and its
        discordant counts against no rescale ("discordant", None where group 0 is not the
        unrescaled forward, as in the empirical pass)."""
        paired = bool(self.groups) and self.groups[0].c == 1.0
        out = {}
        for i, group in enumerate(self.groups):
            for name in group.names:
                out[name] = {
                    "correct": self.boot_correct[i].clone(),
                    "weight": self.boot_weight.clone(),
                    "discordant": tuple(int(v) for v in self.discordant[i]) if paired else None,
                }
        return out


def _accuracy_sums(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([correct, Σ NLL] as float64 on the CPU, the (n,) bool per-image correctness on the
    CPU): the bootstrap's correctness is the very argmax that top-1 counts."""
    logits = logits.double()
    if int(y.max()) >= logits.shape[1]:
        raise VitdiagError(
            f"the data has class index {int(y.max())} but the model has {logits.shape[1]} "
            "outputs; point --data at a dataset with the model's classes."
        )
    logp = torch.log_softmax(logits, dim=1)
    right = logp.argmax(dim=1) == y
    correct = right.sum().double()
    nll = -logp.gather(1, y[:, None]).sum()
    return torch.stack([correct, nll]).cpu(), right.cpu()


# ---------------------------------------------------------------------------------------------
# the rescales one pass measures


def fixed_groups(
    rescales: Sequence[str | float],
    size: tuple[int, int],
    native: tuple[int, int],
    source_model: Any,
    model: Any,
    interpolation: str,
) -> list[RescaleGroup]:
    """Groups for pass A: every rescale whose c is known before seeing data, by distinct c."""
    groups: dict[float, RescaleGroup] = {}
    for method in rescales:
        if method == "empirical" and size != native:
            continue
        # At s0, r = r0 by definition, so the empirical factor is exactly 1.
        c = 1.0 if method == "empirical" else rescale_factor(method, size=size, native=native)
        name = rescale_name(method)
        if c in groups:
            groups[c].names.append(name)
            continue
        table = None if c == 1.0 else target_table(source_model, model, c, interpolation)
        groups[c] = RescaleGroup([name], c, table)
    if 1.0 not in groups:  # the engine's own forward always runs; keep its numbers too
        groups[1.0] = RescaleGroup([], 1.0, None)
    return [groups[1.0], *[g for c, g in groups.items() if c != 1.0]]


def rescale_name(method: str | float) -> str:
    return method if isinstance(method, str) else f"{method:g}"
