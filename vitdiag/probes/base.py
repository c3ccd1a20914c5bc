"""The probe interface: declare the taps you need, keep float64 running sums, compute a Result.

Modelled on torchmetrics' ``Metric`` (``add_state`` with a reduction, ``update``/``compute``),
without its machinery: every state here is a float64 tensor reduced by addition, or a list of
tensors concatenated across processes, which is all the probes need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vitdiag.results import Result

# What a probe may ask the engine for.
LAYERS = "layers"  # grid tokens (and prefix tokens) at every tapped layer
FEATURES = "features"  # output of forward_features (tokens after the final norm)
PRELOGITS = "prelogits"  # classifier input, forward_head(..., pre_logits=True)
LOGITS = "logits"  # model output
LABELS = "labels"  # the probe is meaningless without labels
PATCH = "patch"  # what patch_embed returned in the forward (the variance probe's X)


@dataclass
class Taps:
    """What the engine hands every probe for one batch.

    layers / prefix: layer name -> (B, n, D) grid tokens / (B, p, D) prefix tokens (float32).
    targets: (B,) class indices, -1 where the data has no label.
    positions: (B,) int64, each image's place in the single-process stream of the pass (the
        n-th image read is n − 1), the same whatever the number of processes (when every image
        decodes; distinct images always get distinct positions): the engine computes them from
        its sharding, so a probe never needs to know about processes.
    indices: (B,) int64, each image's index in its source when the loader gives it (the same
        whatever the --limit sample, shard or batch), else its position.
    A probe handed batches outside the engine (positions None) is one process reading one
    stream: `stream_positions` counts for it.
    """

    images: torch.Tensor
    targets: torch.Tensor
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    prefix: dict[str, torch.Tensor] = field(default_factory=dict)
    features: Any = None
    prelogits: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    context: Any = None  # the engine's RunContext, for probes that run extra forwards
    indices: torch.Tensor | None = None  # (B,) source indices, else positions (see above)
    views: dict[str, torch.Tensor] | None = None  # what the loader's workers made (data.Batch)
    patch: Any = None  # patch_embed's output in this batch's forward, as the module returned it
    positions: torch.Tensor | None = None  # (B,) global stream positions (see above)

    @property
    def labelled(self) -> torch.Tensor:
        return self.targets >= 0


def stream_positions(taps: Taps, seen: int) -> torch.Tensor:
    """(B,) int64 global stream positions of this batch: the engine's, else (batches handed
    over directly, one stream) `seen` + 0, 1, … where `seen` counts the images before it."""
    if taps.positions is not None:
        return taps.positions.detach().cpu().to(torch.int64)
    return seen + torch.arange(int(taps.images.shape[0]), dtype=torch.int64)


def global_indices(taps: Taps, seen: int) -> torch.Tensor:
    """(B,) int64 global indices of this batch's images: their source indices when given, else
    their stream positions (`stream_positions`)."""
    if taps.indices is not None:
        return taps.indices.detach().cpu().to(torch.int64)
    return stream_positions(taps, seen)


def first_position(taps: Taps) -> int:
    """The global stream position of the batch's first image (0 when the engine gives none or
    the batch is empty): per-shard randomness is named by it, so that one process draws what it
    always drew and no probe needs to know which process it runs in."""
    if taps.positions is None or taps.positions.numel() == 0:
        return 0
    return int(taps.positions.reshape(-1)[0])


# Which data a probe reads: the training split, the evaluation split, or none at all.
TRAIN, EVAL, NO_DATA = "train", "eval", "none"


class Probe:
    """Base class. Subclasses implement `update` and `compute` and declare their own facts,
    as torchmetrics' ``Metric`` declares its states, so that the runner, `check` and the report
    read them instead of keeping lists of their own:

    name: the probe's name in results, `--probes` and check metric names (``name.key``);
    title: the report section heading;
    split: which data it reads (TRAIN, EVAL, or NO_DATA for data-free probes);
    needs_labels: whether it is meaningless without labelled images;
    needs: the taps it asks the engine for (may be set per instance);
    headlines: regular expressions of the metric keys that go into the report's comparison;
        a plain key (no regex syntax) is a fixed row, placed by (`headline_rank`, position);
        rows from patterns follow the fixed ones in the order they are met;
    headline_rank: the probe's place in the comparison's fixed rows and in `check`'s list;
    check_metrics: templates of the metric keys `check` accepts before a run (``<head>.``,
        ``<size>``, ``<layer>``… stand for parts known only once a model is loaded);
    applies(loaded): None when the probe can run on this model, else one sentence why not;
    order: its place in reports; probes with an order are found by `probes.registry` and run
        by `runner.run_all`, so adding one touches only its own module;
    build(loaded, settings, transform): an instance configured from the run's settings.
    """

    name: str = "probe"
    title: str = ""
    order: int | None = None  # place in `run_all` and in reports; None: not run by `run_all`
    split: str = EVAL
    needs_labels: bool = False
    needs: frozenset[str] = frozenset()
    headlines: tuple[str, ...] = ()
    headline_rank: int = 0
    check_metrics: tuple[str, ...] = ()

    @classmethod
    def applies(cls, loaded: Any) -> str | None:
        return None

    @classmethod
    def build(cls, loaded: Any, settings: Any, transform: Any) -> Probe:
        return cls()

    def __init__(self) -> None:
        self._sum_states: dict[str, torch.Tensor] = {}
        self._cat_states: dict[str, list[torch.Tensor]] = {}

    # -- states ---------------------------------------------------------------------------
    def add_sum_state(self, name: str, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """A float64 running sum; across processes the sums are added."""
        t = torch.zeros(shape, dtype=torch.float64)
        self._sum_states[name] = t
        setattr(self, name, t)
        return t

    def add_cat_state(self, name: str) -> list[torch.Tensor]:
        """A list of tensors; across processes the lists are concatenated (in process order)."""
        lst: list[torch.Tensor] = []
        self._cat_states[name] = lst
        setattr(self, name, lst)
        return lst

    def sum_states(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._sum_states}

    def cat_states(self) -> dict[str, list[torch.Tensor]]:
        return {k: getattr(self, k) for k in self._cat_states}

    def set_state(self, name: str, value: Any) -> None:
        setattr(self, name, value)

    def merge_cat_states(self, gathered: dict[str, list[torch.Tensor]]) -> None:
        """Hook for states that need more than concatenation (e.g. reservoir samples)."""
        for k, v in gathered.items():
            setattr(self, k, v)

    # -- the protocol ---------------------------------------------------------------------
    def update(self, taps: Taps) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self) -> Result:  # pragma: no cover - interface
        raise NotImplementedError
