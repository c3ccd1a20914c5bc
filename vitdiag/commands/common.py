"""The options every command shares, declared once.

`@shared("model", "size", "data", ...)` puts them into a command's signature (the same names,
types, help panels and order as when each command spelled them out) and hands the command one
`Shared` value, its `opts` parameter, instead. The run settings among them (--batch-size, the
probes' options, ...) and their groups ("images", "runtime", "probes", "similarity", ...) are
declared on `vitdiag.settings.Settings`; the model and output options in `vitdiag.options`.
Checks live in `vitdiag.validation` and `vitdiag.settings`, output in `vitdiag.report`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vitdiag import options as o
from vitdiag import settings as declared
from vitdiag.errors import VitdiagError
from vitdiag.validation import check_ranges, parse_model_args

if TYPE_CHECKING:
    from vitdiag.data import ImageSource
    from vitdiag.model import LoadedModel
    from vitdiag.settings import Settings

ImageInterpolation = Annotated[
    str | None,
    typer.Option("--image-interpolation", help="Image resize interpolation (default: model's)."),
]

# parameter name -> option type, for the options that are not run settings; the field of
# `Shared` each fills is the same name, except --image-interpolation (variance, fix-posembed):
# the image `interpolation`, where the command's own --interpolation is the position table's
_OPTIONS: dict[str, Any] = {
    "data": o.Data,
    "arch": o.Arch,
    "ema": o.Ema,
    "unsafe_pickle": o.UnsafePickle,
    "model_arg": o.ModelArg,
    "native_size": o.NativeSize,
    "size": o.Size,
    "image_interpolation": ImageInterpolation,
    "json_out": o.JsonOut,
}
_MODEL = ("arch", "ema", "unsafe_pickle", "model_arg", "native_size")
_FIELD = {"image_interpolation": "interpolation"}
_OWN = frozenset({"data", *_MODEL, "size", "json_out"})


def _group(name: str) -> tuple[str, ...]:
    """The parameter names a `@shared` name stands for: a group, or one option."""
    if name == "model":
        return _MODEL
    if name == "runtime":
        return (*declared.group("runtime"), "json_out")
    return declared.group(name) or (name,)


def _option_type(name: str) -> Any:
    return _OPTIONS[name] if name in _OPTIONS else o.setting(_FIELD.get(name, name))


def _default(name: str) -> Any:
    name = _FIELD.get(name, name)
    if name in _OWN:
        return _OWN_DEFAULTS[name]
    return declared.cli_default(name)


@dataclass
class Shared:
    """The shared options one command was given (the defaults where it has no such option).

    The run settings it was given are in `given` (by `Settings` field) and read as attributes
    too: `opts.batch_size` is the given value or the command line's default."""

    data: str | None = None
    arch: str | None = None
    ema: bool = False
    unsafe_pickle: bool = False
    model_arg: list[str] | None = None
    native_size: int | None = None
    size: int | None = None
    json_out: Path | None = None
    given: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name != "given" and name in declared.options():
            return self.given.get(name, declared.cli_default(name))
        raise AttributeError(name)

    def validate(self) -> None:
        """Every run setting it was given, checked by its declaration (the normalisation
        included), before a model or the data is opened."""
        for name, value in self.given.items():
            declared.check_option(name, value)

    def probe_run(
        self, command: str, *, probes: str, sizes: str | None, data: str | None, val: str | None
    ) -> tuple[set[str] | None, list[int] | None, Settings]:
        """(probes wanted, extra sizes, the runner's Settings) for the commands that run every
        probe (report, trend), each option checked before any work."""
        from vitdiag.runner import parse_probes
        from vitdiag.validation import parse_sizes

        wanted = parse_probes(probes)
        size_list = parse_sizes(sizes) if sizes else None
        if data is None and val is None and wanted != {"classifier"}:
            raise VitdiagError(
                f"{command} needs images: give --data DIR (and --val DIR for held-out)."
            )
        self.validate()
        check_ranges(native_size=self.native_size)
        return wanted, size_list, self.settings(invariance=True)

    def settings(self, *, invariance: bool = False, **more: Any) -> Settings:
        """The runner's `Settings`: the run settings given, plus those in `more` (fields that
        are no options, such as label, or values the command worked out itself)."""
        return declared.build_settings({**self.given, **more}, invariance=invariance)

    def open(self, data: str | None = None) -> ImageSource:
        """The data (--data unless another path is given), its options checked first."""
        from vitdiag.data import open_dataset

        data = self.data if data is None else data
        if data is None:
            raise VitdiagError("this command needs images: give --data DIR (or --data synthetic).")
        self.validate()
        return open_dataset(data, **declared.dataset_options(self))

    def load(
        self, ckpt: str | None, size: int | None = None, *, data: bool = False
    ) -> tuple[LoadedModel, ImageSource | None]:
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

    def each(self, ckpts: list[str | None], size: int | None = None) -> Iterator[LoadedModel]:
        """Each checkpoint loaded in turn; the caller drops it before the next one (they can be
        large, so only one is held at a time)."""
        for ckpt in ckpts:
            loaded, _ = self.load(ckpt, size)
            yield loaded
            del loaded

    def study_inputs(
        self, loaded: LoadedModel
    ) -> tuple[ImageSource | None, list[str], dict[str, Any]]:
        """What a study (variance, fix-posembed) reads: the data when --data is given, the
        label notes, and the study's keyword arguments for data and runtime."""
        from vitdiag.runner import Runtime, label_notes, loader_for, transform_at

        source = self.open() if self.data is not None else None
        s = self.settings()
        notes = label_notes(loaded, source, s) if source is not None else []

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
                **Runtime(s).engine_options(),
            ),
        )


_OWN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Shared) if f.name in _OWN}


def shared(*names: str) -> Callable[[Callable], Callable]:
    """Put the named shared options (or groups: model, images, runtime, probes, similarity,
    invariance, collapse) where the command's `opts: Shared` parameter stands, and call the
    command with them gathered in `opts` (with those the command declares itself under a shared
    name, e.g. a --data with its own help)."""
    params = [p for n in names for p in _group(n)]

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "opts"]
        at = list(sig.parameters).index("opts")
        kind = inspect.Parameter.KEYWORD_ONLY
        added = [
            inspect.Parameter(n, kind, default=_default(n), annotation=_option_type(n))
            for n in params
        ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            given = {_FIELD.get(n, n): kwargs.pop(n) for n in params}
            # an option the command declares itself (its own help) still fills `opts`
            known = _OWN | declared.options().keys()
            given.update((n, kwargs[n]) for n in kwargs.keys() & known - given.keys())
            return fn(**kwargs, opts=_gathered(given))

        own = [p.replace(kind=kind) for p in own]
        command.__signature__ = sig.replace(parameters=[*own[:at], *added, *own[at:]])
        command.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
        return command

    return wrap


def _gathered(given: dict[str, Any]) -> Shared:
    """One `Shared` from option values by field name: its own fields, the rest run settings."""
    settings = {n: v for n, v in given.items() if n not in _OWN}
    return Shared(**{n: v for n, v in given.items() if n in _OWN}, given=settings)
