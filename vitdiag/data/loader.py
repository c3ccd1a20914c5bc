"""Batches from a source: the (limited, sharded) selection, unreadable files counted per batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vitdiag.data.sources import ImageSource, SyntheticSource, UnreadableImageError, shown
from vitdiag.errors import VitdiagError


@dataclass
class Batch:
    """One batch: images that decoded, their targets (-1 unlabelled), and what was skipped.

    ``n_unreadable`` counts the files skipped since the previous yielded batch (including those of
    wholly unreadable batches, which are not yielded), so summing it over batches gives the exact
    total. ``indices`` are the source indices of ``images``. ``views``: what the loader's
    ``views`` maker returned for each image, stacked (name -> (B, ...)), made in the workers.
    """

    images: torch.Tensor
    targets: torch.Tensor
    n_unreadable: int = 0
    indices: torch.Tensor | None = None
    unreadable: list[str] = field(default_factory=list)
    views: dict[str, torch.Tensor] | None = None


# What a loader's `views` maker is given for one image: (the decoded image (a synthetic source's
# tensor), the transform's 8-bit crop of it (None for synthetic data), the clean input tensor,
# the source index); it returns named tensors that are stacked per batch.
ViewMaker = Callable[[Any, Any, torch.Tensor, int], dict[str, torch.Tensor]]


class merged_views:  # noqa: N801 - used like a function
    """One `ViewMaker` from several (their names must differ): what each returns, together."""

    def __init__(self, makers: list[ViewMaker]) -> None:
        self.makers = list(makers)

    def __call__(
        self, image: Any, crop: Any, clean: torch.Tensor, index: int
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for maker in self.makers:
            out.update(maker(image, crop, clean, index))
        return out


# (image or None when unreadable, target, source index, (name, reason) when unreadable, views)
_Item = tuple[torch.Tensor | None, int, int, tuple[str, str] | None, dict | None]


class _Selection(Dataset):
    """The (limited, sharded) view a loader reads; failures come back as values, not raises."""

    def __init__(
        self,
        source: ImageSource,
        indices: list[int],
        transform: Callable | None,
        size: tuple[int, int] | None,
        views: ViewMaker | None = None,
    ) -> None:
        self.source = source
        self.indices = indices
        self.transform = transform
        self.size = size
        self.views = views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> _Item:
        index = self.indices[k]
        if isinstance(self.source, SyntheticSource):
            assert self.size is not None
            tensor = self.source.tensor(index, self.size)
            views = self.views(tensor, None, tensor, index) if self.views is not None else None
            return tensor, -1, index, None, views
        try:
            img, target = self.source[index]
            crop = None
            if self.views is not None and hasattr(self.transform, "crop"):
                # The clean input from the same crop the views start from (identical to
                # transform(img)), so the resize is done once.
                crop = self.transform.crop(img)
                tensor = self.transform.normalise(crop)
            else:
                tensor = self.transform(img) if self.transform is not None else img
        except UnreadableImageError as exc:
            # Returned, not raised: a raise inside a worker would reach the user wrapped in a
            # multi-line DataLoader traceback, and non-strict runs must go on.
            return None, -1, index, (exc.name, exc.reason), None
        views = self.views(img, crop, tensor, index) if self.views is not None else None
        return tensor, target, index, None, views


def _collate(items: list[_Item]) -> tuple[Any, ...]:
    good = [it for it in items if it[0] is not None]
    failed = [it[3] for it in items if it[3] is not None]
    images = torch.stack([it[0] for it in good]) if good else None
    targets = torch.tensor([it[1] for it in good], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in good], dtype=torch.int64)
    views = None
    if good and good[0][4] is not None:
        views = {k: torch.stack([it[4][k] for it in good]) for k in good[0][4]}
    return images, targets, indices, failed, views


def select_indices(
    n: int,
    *,
    limit: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = False,
    prefix: bool = False,
    targets: list[int] | None = None,
    per_class: int | None = None,
) -> list[int]:
    """Indices a loader reads: seeded shuffle then first ``limit`` (or a prefix), then shard.

    Shards are strided (``rank::world_size``): disjoint, no padding, union = the whole list.
    """
    if limit is not None and limit <= 0:
        raise VitdiagError(f"--limit must be a positive number of images, got {limit}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if per_class is not None:
        # A stated per-class subsample: the first `per_class` of each class in a seeded shuffle.
        if per_class <= 0:
            raise VitdiagError(f"--per-class must be a positive number, got {per_class}.")
        if targets is None:
            raise VitdiagError("--per-class needs labelled data (an ImageFolder or labelled tar).")
        gen = torch.Generator().manual_seed(seed)
        taken: dict[int, int] = {}
        order = []
        for i in torch.randperm(n, generator=gen).tolist():
            if taken.get(targets[i], 0) < per_class:
                taken[targets[i]] = taken.get(targets[i], 0) + 1
                order.append(i)
        if limit is not None:
            order = order[:limit]
        return order[rank::world_size]
    if prefix:
        order = list(range(n if limit is None else min(limit, n)))
    elif limit is not None or shuffle:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=gen).tolist()
        if limit is not None:
            order = order[:limit]
    else:
        order = list(range(n))
    return order[rank::world_size]


class Loader:
    """A re-iterable stream of ``Batch``; ``len()`` is the number of underlying loader batches
    (an upper bound on what is yielded, since wholly unreadable batches are merged away)."""

    def __init__(
        self, source: ImageSource, selection: _Selection, loader: DataLoader, workers: int = 0
    ) -> None:
        self.source = source
        self.indices = selection.indices
        self._loader = loader
        self.workers = workers  # the worker processes actually started

    def __len__(self) -> int:
        return len(self._loader)

    @property
    def n_images(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Batch]:
        held: Batch | None = None
        pending: list[tuple[str, str]] = []
        for images, targets, indices, failed, views in self._loader:
            if failed and self.source.strict:
                raise UnreadableImageError(*failed[0])
            pending.extend(failed)
            if images is None:
                continue
            names = [name for name, _ in pending]
            batch = Batch(images, targets, len(pending), indices, names, views)
            pending = []
            if held is not None:
                yield held
            held = batch
        if held is not None:
            # Trailing failures join the last batch so every skipped file is counted once.
            held.n_unreadable += len(pending)
            held.unreadable.extend(name for name, _ in pending)
            yield held
        elif pending:
            name, reason = pending[0]
            what = "The only image" if len(pending) == 1 else f"All {len(pending)} images"
            raise VitdiagError(
                f"{what} read from {shown(self.source.source)} could not be decoded "
                f"(first: {name}, {reason}); check that they are valid image files."
            )


def make_loader(
    source: ImageSource,
    transform: Callable | None,
    *,
    batch_size: int = 64,
    workers: int = 0,
    limit: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    shuffle: bool = False,
    per_class: int | None = None,
    views: ViewMaker | None = None,
    pin_memory: bool | None = None,
) -> Loader:
    """Batches of transformed images from ``source``.

    ``limit`` takes the first ``limit`` images of a ``seed``-ed shuffle (a fair sample of all
    classes; for synthetic data simply the first ``limit``); without it the order is the
    source's own (sorted) order, or a seeded shuffle with ``shuffle=True``. ``rank`` /
    ``world_size`` take a strided shard of that list with no padding, so sums over ranks equal
    the single-process sums. For synthetic sources the transform is not applied; the size
    comes from ``transform.size`` (an ``EvalTransform``) or else ``source.size``.
    Also records ``limit`` and ``seed`` on the source for ``describe()``.

    ``workers`` processes decode (and make ``views``, see ``ViewMaker``) while the main process
    computes; they stay up between iterations, so passes over one loader share them. Fewer are
    started when there are fewer batches, and none for a single batch, where nothing could
    overlap. ``pin_memory`` (default: when CUDA is present) page-locks batches so copies to the
    GPU can be non-blocking.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise VitdiagError(f"--batch-size must be a positive integer, got {batch_size}.")
    if workers < 0:
        raise VitdiagError(f"--workers must be 0 or more, got {workers}.")
    if transform is None and not source.synthetic:
        raise ValueError("a transform is needed to turn images into tensors (see eval_transform)")
    size: tuple[int, int] | None = None
    if source.synthetic:
        size = getattr(transform, "size", None) or source.size
        if size is None:
            raise ValueError(
                "synthetic data needs a size: pass an EvalTransform or set source.size"
            )
        size = (int(size[0]), int(size[1]))
        source.size = size
    indices = select_indices(
        len(source),
        limit=limit,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle=shuffle,
        prefix=source.synthetic,
        targets=getattr(source, "targets", None) if source.labelled else None,
        per_class=per_class,
    )
    source.limit = limit
    if not source.synthetic:  # a synthetic source reports the seed of its pixels instead
        source.seed = seed
    selection = _Selection(source, indices, None if source.synthetic else transform, size, views)
    n_batches = len(indices) // batch_size if drop_last else -(-len(indices) // batch_size)
    workers = min(workers, n_batches) if n_batches > 1 else 0
    loader = DataLoader(
        selection,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
    )
    return Loader(source, selection, loader, workers)
