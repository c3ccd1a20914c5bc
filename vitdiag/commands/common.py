"""The options every command shares, declared once.

`@shared("model", "size", "data", ...)` puts them into a command's signature (the same names,
types, help panels and order as when each command spelled them out) and hands the command one
`Shared` value instead. Checks live in `vitdiag.validation`, output in `vitdiag.report`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from vitdiag import options as o
from vitdiag.errors import VitdiagError
from vitdiag.validation import check_ranges, parse_model_args, parse_norm

ImageInterpolation = Annotated[
    str | None,
    typer.Option("--image-interpolation", help="Image resize interpolation (default: model's)."),
]

# parameter name -> option type; the field of `Shared` it fills (and whose default it takes)
# is the same name, except --image-interpolation (variance, fix-posembed): the image
# `interpolation`, where the command's own --interpolation is the position table's
_OPTIONS: dict[str, Any] = {
    "data": o.Data,
    "arch": o.Arch,
    "ema": o.Ema,
    "unsafe_pickle": o.UnsafePickle,
    "model_arg": o.ModelArg,
    "native_size": o.NativeSize,
    "size": o.Size,
    "limit": o.Limit,
    "batch_size": o.BatchSize,
    "workers": o.Workers,
    "seed": o.Seed,
    "strict": o.Strict,
    "mean": o.Mean,
    "std": o.Std,
    "interpolation": o.Interpolation,
    "image_interpolation": ImageInterpolation,
    "crop_pct": o.CropPct,
    "device": o.Device,
    "amp": o.Amp,
    "channels_last": o.ChannelsLast,
    "json_out": o.JsonOut,
    "quiet": o.Quiet,
}
_GROUPS = {
    "model": ("arch", "ema", "unsafe_pickle", "model_arg", "native_size"),
    "images": ("limit", "batch_size", "workers", "seed", "strict", "mean", "std"),
    "runtime": ("device", "amp", "channels_last", "json_out", "quiet"),
}
_FIELD = {"image_interpolation": "interpolation"}


@dataclass
class Shared:
    """The shared options one command was given (the defaults where it has no such option)."""

    data: str | None = None
    arch: str | None = None
    ema: bool = False
    unsafe_pickle: bool = False
    model_arg: list[str] | None = None
    native_size: int | None = None
    size: int | None = None
    limit: int | None = None
    batch_size: int = 64
    workers: int = o.DEFAULT_WORKERS
    seed: int = 0
    strict: bool = False
    mean: str | None = None
    std: str | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    device: str = "auto"
    amp: str = "off"
    channels_last: bool = False
    json_out: Path | None = None
    quiet: bool = False

    def validate(self) -> None:
        """Every data range and the normalisation, before a model or the data is opened."""
        check_ranges(
            limit=self.limit,
            batch_size=self.batch_size,
            workers=self.workers,
            seed=self.seed,
            crop_pct=self.crop_pct,
        )
        parse_norm(self.mean, self.std)

    def probe_run(
        self,
        command: str,
        *,
        probes: str,
        sizes: str | None,
        data: str | None,
        val: str | None,
        per_class: int | None,
        layers: str | None,
        erank_every: int,
        aug: str,
        views: int,
        embedding: str,
        pairs: int,
        budget: int,
    ):
        """(probes wanted, extra sizes, the runner's Settings) for the commands that run every
        probe (report, trend), each option checked before any work."""
        from vitdiag.runner import parse_probes
        from vitdiag.validation import check_invariance_options, parse_sizes

        wanted = parse_probes(probes)
        size_list = parse_sizes(sizes) if sizes else None
        if data is None and val is None and wanted != {"classifier"}:
            raise VitdiagError(
                f"{command} needs images: give --data DIR (and --val DIR for held-out)."
            )
        self.validate()
        check_ranges(
            pairs=pairs,
            nc4_budget=budget,
            per_class=per_class,
            native_size=self.native_size,
            erank_every=erank_every,
        )
        check_invariance_options(aug, views, embedding)
        return (
            wanted,
            size_list,
            self.settings(
                per_class=per_class,
                layers=[v.strip() for v in layers.split(",")] if layers else None,
                erank_every=erank_every,
                aug=aug,
                views=views,
                embedding=embedding,
                pairs=pairs,
                nc4_budget=budget,
            ),
        )

    def settings(self, **more: Any):
        """The runner's `Settings`: data and runtime options, plus the probe options in `more`."""
        from vitdiag.runner import Settings

        mean, std = parse_norm(self.mean, self.std)
        names = ("batch_size", "workers", "limit", "seed", "strict", "interpolation", "crop_pct")
        fields = {n: getattr(self, n) for n in (*names, "device", "amp", "channels_last")}
        return Settings(**{**fields, "mean": mean, "std": std, "quiet": self.quiet, **more})

    def open(self, data: str | None = None):
        """The data (--data unless another path is given), its options checked first."""
        from vitdiag.data import open_dataset

        data = self.data if data is None else data
        if data is None:
            raise VitdiagError("this command needs images: give --data DIR (or --data synthetic).")
        self.validate()
        return open_dataset(data, strict=self.strict, seed=self.seed)

    def load(self, ckpt: str | None, size: int | None = None, *, data: bool = False):
        """The checkpoint loaded as the model options say, rebuilt at `size` when one is given.

        data: open --data between the two, the order errors are reported in."""
        from vitdiag.model import at_size, load

        if ckpt is None and self.arch is None:
            raise VitdiagError(
                "give a checkpoint path, or --arch NAME for a model with random weights."
            )
        loaded = load(
            ckpt,
            arch=self.arch,
            ema=self.ema,
            unsafe_pickle=self.unsafe_pickle,
            model_args=parse_model_args(self.model_arg) or None,
            native_size=self.native_size,
        )
        source = self.open() if data else None
        return (at_size(loaded, size) if size is not None else loaded), source

    def each(self, ckpts: list[str | None], size: int | None = None) -> Iterator[Any]:
        """Each checkpoint loaded in turn; the caller drops it before the next one (they can be
        large, so only one is held at a time)."""
        for ckpt in ckpts:
            loaded, _ = self.load(ckpt, size)
            yield loaded
            del loaded

    def study_inputs(self, loaded: Any) -> tuple[Any, list[str], dict[str, Any]]:
        """What a study (variance, fix-posembed) reads: the data when --data is given, the
        label notes, and the study's keyword arguments for data and runtime."""
        from vitdiag.runner import label_notes, loader_for, transform_at

        source = self.open() if self.data is not None else None
        notes = label_notes(loaded, source) if source is not None else []
        s = self.settings()

        def batches_at(at: Any, size: Any) -> Any:
            return loader_for(source, transform_at(at.data_config, s, size), s)

        given = source is not None
        return (
            source,
            notes,
            dict(
                batches_at=batches_at if given else None,
                accuracy=given and source.labelled,
                total_images=min(len(source), self.limit or len(source)) if given else None,
                **{
                    n: getattr(self, n) for n in ("device", "amp", "channels_last", "seed", "quiet")
                },
            ),
        )


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Shared)}


def shared(*names: str) -> Callable[[Callable], Callable]:
    """Put the named shared options (or groups: model, images, runtime) where the command's
    `c: Shared` parameter stands, and call the command with them gathered in `c` (with those
    the command declares itself under a shared name, e.g. a --data with its own help)."""
    params = [p for n in names for p in _GROUPS.get(n, (n,))]

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "c"]
        at = list(sig.parameters).index("c")
        kind = inspect.Parameter.KEYWORD_ONLY
        added = [
            inspect.Parameter(n, kind, default=_DEFAULTS[_FIELD.get(n, n)], annotation=_OPTIONS[n])
            for n in params
        ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            given = {_FIELD.get(n, n): kwargs.pop(n) for n in params}
            # an option the command declares itself (its own help) still fills `c`
            given.update((n, kwargs[n]) for n in kwargs.keys() & _DEFAULTS.keys() - given.keys())
            return fn(**kwargs, c=Shared(**given))

        own = [p.replace(kind=kind) for p in own]
        command.__signature__ = sig.replace(parameters=[*own[:at], *added, *own[at:]])
        command.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
        return command

    return wrap
