"""Every probe that applies to a model, one pass per dataset: the library behind `report`/`check`.

The engine already feeds every probe from one forward per batch; this module decides which
probes apply (from the family table and the data), builds them, and arranges the passes:

- the training data (``source``) feeds collapse, mixup geometry, similarity and invariance;
- the validation data (``val_source``, else ``source``) feeds eval, calibration and variance;
- with a single dataset everything shares one pass, with two there is one pass per dataset.

Extra forwards happen only where a probe needs other inputs than the clean batch: augmented
views (invariance), mixed pairs (mixup geometry), a rescaled position table, and other image
sizes (variance: one pass per extra size, plus one for the empirical table when labelled).
The variance probe's native-size numbers come from the shared pass: `variance_study` is handed
that probe (`native_pass`) and reads the data again only at the other sizes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitdiag.errors import VitdiagError
from vitdiag.results import Result
from vitdiag.runtime import Runtime
from vitdiag.settings import Settings, dataset_options

if TYPE_CHECKING:
    import torch

    from vitdiag.data import ImageSource
    from vitdiag.data.loader import Loader, ViewMaker
    from vitdiag.data.transforms import EvalTransform
    from vitdiag.engine import RunSummary
    from vitdiag.model import LoadedModel
    from vitdiag.probes.base import Probe
    from vitdiag.probes.variance import VarianceShiftProbe

__all__ = ["Plan", "Results", "Runtime", "Settings", "run_all", "run_pass"]

Size = int | tuple[int, int]


class Results(list):
    """A ``list[Result]`` that also says how it was obtained.

    data: dataset role ("data", "val") -> the source's description with the images used;
    skipped: probe -> why it does not apply; passes: one label per engine pass, in order.
    """

    def __init__(self, items: Iterable[Result] = ()) -> None:
        super().__init__(items)
        self.data: dict[str, dict[str, object]] = {}
        self.skipped: dict[str, str] = {}
        self.passes: list[str] = []
        self.seconds = 0.0
        self.world_size = 1


@dataclass
class Plan:
    """Which probes run on which data (in report order), and why the others do not."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    data_free: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def probes(self) -> list[str]:
        chosen = {*self.train, *self.val, *self.data_free}
        return [p for p in probe_names() if p in chosen]


def probe_names() -> tuple[str, ...]:
    from vitdiag.probes.registry import probe_names

    return probe_names()


def parse_probes(text: str | Iterable[str] | None) -> set[str] | None:
    """A comma list (or iterable) of probe names, checked; None or "all" means every probe."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    names = {v.strip().lower().replace("-", "_") for v in items if v.strip()}
    if "all" in names:
        return None
    known = probe_names()
    unknown = sorted(names - set(known))
    if unknown or not names:
        raise VitdiagError(
            f"unknown probe(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(known)} (or all)."
        )
    return names


def why_not(
    name: str, loaded: LoadedModel, train: ImageSource | None, val: ImageSource | None
) -> str | None:
    """None if probe `name` applies to this model and data, else one sentence why not."""
    from vitdiag.probes.base import EVAL, NO_DATA
    from vitdiag.probes.registry import probe_class

    cls = probe_class(name)
    data = None if cls.split == NO_DATA else val if cls.split == EVAL else train
    if cls.split != NO_DATA and data is None:
        return "it needs images: give a dataset (--data)."
    why = cls.applies(loaded)
    if why is None and cls.needs_labels and not data.labelled:
        which = "--val" if cls.split == EVAL and val is not train else "--data"
        why = f"it needs labelled images (class sub-folders) and the {which} data has none."
    return why


def require(loaded: LoadedModel, names: Iterable[str]) -> None:
    """Refuse, with the probe's own sentence, a model that a wanted probe cannot measure."""
    from vitdiag.probes.registry import probe_class

    for name in names:
        why = probe_class(name).applies(loaded)
        if why is not None:
            raise VitdiagError(why)


def plan_probes(
    loaded: LoadedModel,
    source: ImageSource | None,
    val_source: ImageSource | None = None,
    probes: set[str] | None = None,
) -> Plan:
    """Decide the probes: all that apply when `probes` is None; asking for one that does not
    apply is an error (a check could never be evaluated)."""
    from vitdiag.probes.base import NO_DATA, TRAIN
    from vitdiag.probes.registry import probe_class

    val = val_source if val_source is not None else source
    plan = Plan()
    for name in probe_names():
        if probes is not None and name not in probes:
            continue
        why = why_not(name, loaded, source, val)
        if why is not None:
            if probes is not None:
                raise VitdiagError(f"the {name} probe does not apply here: {why}")
            plan.skipped[name] = why
            continue
        split = probe_class(name).split
        lists = {NO_DATA: plan.data_free, TRAIN: plan.train}
        lists.get(split, plan.val).append(name)
    return plan


def open_source(
    data: str | os.PathLike[str] | ImageSource | None, settings: Settings
) -> ImageSource | None:
    """An `ImageSource` from a path/spec string, or the source itself."""
    if data is None or not isinstance(data, (str, os.PathLike)):
        return data
    from vitdiag.data import open_dataset

    return open_dataset(str(data), **dataset_options(settings))


def align_labels(
    loaded: LoadedModel,
    source: ImageSource,
    s: Settings | None = None,
    reference: Sequence[str] | None = None,
) -> str | None:
    """Number `source`'s classes as the model's outputs (`vitdiag.data.labels`: by name when the
    model carries class names, else by folder order) and return the rule, one line; None for
    unlabelled data. Refuses data with more classes than outputs, and a partial name match.

    reference: the training data's classes, which number a held-out split's in positional mode.
    The map is set on `source` (its `target_map`), so every loader of it reads true indices."""
    if not source.labelled or source.classes is None:
        return None
    if len(source.classes) > loaded.num_classes:
        raise VitdiagError(
            f"the data has {len(source.classes)} classes but the model has {loaded.num_classes} "
            "outputs; point --data at a dataset with the model's classes."
        )
    from vitdiag.data import class_indices

    mode = s.labels if s is not None else "auto"
    names = loaded.provenance.get("label_names")
    found = class_indices(source.classes, names, mode, reference=reference, where=source.source)
    if max(found.index, default=-1) >= loaded.num_classes:
        raise VitdiagError(
            f"the classes of {source.source} reach output {max(found.index)} but the model has "
            f"{loaded.num_classes} outputs; point it at a dataset with the model's classes."
        )
    source.target_map = None if found.identity else found.index
    return found.rule


def _mismatch_notes(loaded: LoadedModel, source: ImageSource, rule: str | None) -> list[str]:
    names = loaded.provenance.get("label_names")
    positional = rule is not None and rule.startswith("positional")
    if positional and names and list(names) != list(source.classes or ()):
        return [
            "the data's class folders are not named like the checkpoint's label_names; "
            "accuracy assumes folder order = output order."
        ]
    return []


def label_notes(
    loaded: LoadedModel,
    source: ImageSource,
    s: Settings | None = None,
    reference: Sequence[str] | None = None,
) -> list[str]:
    """`align_labels`, and the notes for the results that read the labels: the rule, and
    whether folder names differ from the checkpoint's label names."""
    rule = align_labels(loaded, source, s, reference)
    head = [f"labels: {rule}"] if rule is not None else []
    return head + _mismatch_notes(loaded, source, rule)


def run_all(
    loaded: LoadedModel,
    source: str | os.PathLike[str] | ImageSource | None,
    *,
    probes: set[str] | Iterable[str] | str | None = None,
    val_source: str | os.PathLike[str] | ImageSource | None = None,
    sizes: Sequence[Size] | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> Results:
    """Run every probe that applies (or those in `probes`) with one engine pass per dataset.

    loaded: a `vitdiag.load(...)` result. source / val_source: `open_dataset(...)` sources or
    path strings; val_source defaults to source, and source None runs the data-free probes
    only. sizes: extra test sizes for the variance probe. Options are `Settings` fields
    (batch_size=32, limit=100, device="cuda", ...).
    Under torchrun every rank must call this; data are sharded and the sums all-reduced, so
    every rank returns the same results. The model's train/eval flags and the global RNG
    states are as the caller left them afterwards (rebuilding the model at another size draws
    fresh initial weights before loading its own).
    """
    from vitdiag.engine import unchanged

    s = dataclasses.replace(settings or Settings(), **options)
    with unchanged(loaded.model):
        return _run_all(loaded, source, val_source, probes, sizes, s)


def _run_all(
    loaded: LoadedModel,
    source: str | os.PathLike[str] | ImageSource | None,
    val_source: str | os.PathLike[str] | ImageSource | None,
    probes: set[str] | Iterable[str] | str | None,
    sizes: Sequence[Size] | None,
    s: Settings,
) -> Results:
    from vitdiag.distributed import init_distributed

    wanted = parse_probes(probes) if isinstance(probes, str) else probes
    if wanted is not None:
        wanted = parse_probes(list(wanted))
    run = Runtime(s, open_source(source, s), open_source(val_source, s))
    plan = plan_probes(loaded, run.source, run.val_source, wanted)
    init_distributed()

    out = Results()
    out.skipped = dict(plan.skipped)
    found: dict[str, Result] = {
        n: build_probe(n, loaded, None, run.settings).compute() for n in plan.data_free
    }

    start = time.perf_counter()
    splits = run.splits()
    for role, data in splits:
        names = plan.train + plan.val if len(splits) == 1 else getattr(plan, _SPLIT[role])
        if not names:
            continue
        found.update(_one_pass(loaded, run, data, role, names, sizes, out))
    if run.source is not None:
        _add_random_init_references(loaded, run, found, out)
    out.seconds = time.perf_counter() - start
    out.extend(found[p] for p in probe_names() if p in found)
    return out


_SPLIT = {"data": "train", "val": "val"}  # a pass's role -> the Plan list it runs


def transform_at(data_config: dict[str, object], s: Settings, size: Size) -> EvalTransform:
    """The eval transform at `size` with the run's normalisation and crop overrides."""
    from vitdiag.data import eval_transform

    return eval_transform(
        data_config,
        size,
        mean=s.mean,
        std=s.std,
        interpolation=s.interpolation,
        crop_pct=s.crop_pct,
    )


def loader_for(
    source: ImageSource,
    transform: EvalTransform | None,
    s: Settings,
    per_class: int | None = None,
    views: ViewMaker | None = None,
) -> Loader:
    """This process's shard of `source` through `transform`, as the run's settings ask.

    views: a `vitdiag.data.ViewMaker` whose output the workers add to each batch."""
    from vitdiag.data import make_loader
    from vitdiag.distributed import join_shard
    from vitdiag.engine import resolve_device

    shard = join_shard()
    return make_loader(
        source,
        transform,
        batch_size=s.batch_size,
        workers=s.workers,
        limit=s.limit,
        seed=s.seed,
        rank=shard.rank,
        world_size=shard.world,
        per_class=per_class,
        views=views,
        pin_memory=resolve_device(s.device).type == "cuda",
    )


def build_probe(
    name: str, loaded: LoadedModel, transform: EvalTransform | None, s: Settings
) -> Probe:
    """Probe `name` configured from the run's settings (its class's own `build`)."""
    from vitdiag.probes.registry import probe_class

    return probe_class(name).build(loaded, s, transform)


@dataclass
class Pass:
    """One engine pass: the engine's summary, the data it read and the notes for its results."""

    summary: RunSummary
    data: dict[str, object]
    notes: list[str]
    labels: str | None = None  # the label rule (`align_labels`), for the results that read them


def run_pass(
    loaded: LoadedModel | None,
    source: ImageSource,
    probes: list[Probe],
    s: Settings,
    *,
    transform: EvalTransform,
    per_class: int | None = None,
    description: str = "data",
    model: torch.nn.Module | None = None,
    reference_classes: Sequence[str] | None = None,
) -> Pass:
    """Check the labels, feed `probes` one pass over `source`, and say what was read.

    model: what the engine runs when it is not `loaded.model` (loaded None: no label check).
    reference_classes: the training data's classes when `source` is a held-out split.
    """
    from vitdiag.engine import run_probes

    rule, notes = None, []
    if loaded is not None and s.label_check:
        rule = align_labels(loaded, source, s, reference_classes)
        notes = _mismatch_notes(loaded, source, rule)
    loader = loader_for(source, transform, s, per_class, views=_loader_views(probes))
    summary = run_probes(
        model if model is not None else loaded.model,
        loader,
        probes,
        loaded=loaded,
        total_images=loader.n_images,
        description=s.label or description,
        **Runtime(s).engine_options(),
    )
    if summary.n_unreadable:
        notes.append(
            f"{summary.n_unreadable} unreadable image(s) were skipped (--strict fails instead)."
        )
    if source.n_unsafe_members:
        notes.append(
            f"{source.n_unsafe_members} tar member(s) with an absolute or '..' path were ignored."
        )
    desc = dict(source.describe(), n_images=summary.n_images, n_unreadable=summary.n_unreadable)
    if rule is not None:
        desc["labels"] = rule
    return Pass(summary, desc, notes, rule)


def _loader_views(probes: list[Probe]) -> ViewMaker | None:
    """What the probes ask the loader's workers to make besides the clean batch (augmented
    views), merged into one maker; None when nothing."""
    makers = [m for p in probes if (m := getattr(p, "loader_views", lambda: None)()) is not None]
    if len(makers) <= 1:
        return makers[0] if makers else None
    from vitdiag.data import merged_views

    return merged_views(makers)


def _one_pass(
    loaded: LoadedModel,
    run: Runtime,
    source: ImageSource,
    role: str,
    names: list[str],
    sizes: Sequence[Size] | None,
    out: Results,
) -> dict[str, Result]:
    from vitdiag.probes.base import TRAIN
    from vitdiag.probes.registry import probe_class

    s = run.settings
    transform = transform_at(loaded.data_config, s, loaded.img_size)
    per_class = s.per_class if any(probe_class(n).split == TRAIN for n in names) else None
    variance_here = "variance" in names and _at_native(loaded)
    # Variance at a non-native size cannot share this pass: it owns its passes entirely.
    shared = [n for n in names if n != "variance" or variance_here]
    probes = {n: build_probe(n, loaded, transform, s) for n in shared}
    done = run_pass(
        loaded,
        source,
        list(probes.values()),
        s,
        transform=transform,
        per_class=per_class,
        description=role,
        reference_classes=_reference_classes(run, role),
    )
    summary = done.summary
    out.passes.append(role)
    out.world_size = summary.world_size
    out.data[role] = done.data
    found = {}
    for name, result in zip(shared, summary.results, strict=True):
        if name == "variance":
            continue
        found[name] = result
    if "variance" in names:
        native = None if "variance" not in probes else (probes["variance"], summary)
        found["variance"] = _variance(loaded, run, source, sizes or [], native, out, per_class)
    for name, result in found.items():
        if done.labels is not None and _reads_labels(name):
            result.notes.append(f"labels: {done.labels}")
        result.notes.extend(done.notes)
        result.extra["dataset"] = role
        if name == "calibration" and role == "data" and "val" not in out.data:
            result.notes.append(
                "measured on --data: give --val for calibration on held-out images."
            )
    return found


def _reference_classes(run: Runtime, role: str) -> list[str] | None:
    """The training data's classes, which number the held-out split's when the model carries
    no class names (a --val lacking one of --data's classes keeps --data's indices)."""
    train = run.source
    if role != "val" or train is None or not train.labelled or train.classes is None:
        return None
    return list(train.classes)


# Eval and variance read labels when there are some (accuracy) but still measure without them,
# so they do not declare needs_labels; the label rule belongs on their results too.
_ALSO_READ_LABELS = frozenset({"eval", "variance"})


def _reads_labels(name: str) -> bool:
    from vitdiag.probes.registry import probe_class

    return name in _ALSO_READ_LABELS or probe_class(name).needs_labels


# probe -> the metric its random-init reference is read for (docs/FINDINGS.md)
REFERENCE_METRICS = {"similarity": "last_block", "collapse": "nc1"}


def _add_random_init_references(
    loaded: LoadedModel, run: Runtime, found: dict[str, Result], out: Results
) -> None:
    """One more pass: the same architecture at random initialisation, on a seeded sample of
    `reference_images` images of the training data, through the probes that have such a
    reference; what it measures goes into the trained results' `references.random_init`."""
    from vitdiag.model import random_init_like

    s = run.settings
    names = [n for n in REFERENCE_METRICS if n in found and found[n].extra.get("dataset")]
    if not names or s.reference_images <= 0:
        return
    reference = random_init_like(loaded, seed=s.seed)
    k = min(s.reference_images, s.limit or s.reference_images)
    # A seeded sample (not the source's class-sorted order), so every class is in it.
    ref_settings = dataclasses.replace(s, limit=k, per_class=None, label="random-init reference")
    transform = transform_at(loaded.data_config, ref_settings, loaded.img_size)
    probes = [build_probe(n, reference, transform, ref_settings) for n in names]
    done = run_pass(reference, run.source, probes, ref_settings, transform=transform)
    out.passes.append("random-init reference")
    n_images = done.data.get("n_images")
    for name, result in zip(names, done.summary.results, strict=True):
        metric = REFERENCE_METRICS[name]
        entry = (result.extra.get("intervals") or {}).get(metric) or {}
        found[name].extra.setdefault("references", {})["random_init"] = {
            "metric": metric,
            "value": result.metrics.get(metric),
            "interval": [entry["lo"], entry["hi"]] if entry else None,
            "how": f"the same architecture ({loaded.arch}) at timm's random initialisation "
            f"(seed {s.seed}) on {n_images} images of the same data (a seeded sample), "
            "through the same probe; unpaired with the trained model's images",
        }


def _at_native(loaded: LoadedModel) -> bool:
    return tuple(loaded.img_size) == tuple(loaded.native_size)


def _variance(
    loaded: LoadedModel,
    run: Runtime,
    source: ImageSource,
    sizes: Sequence[Size],
    native_pass: tuple[VarianceShiftProbe, RunSummary] | None,
    out: Results,
    per_class: int | None = None,
) -> Result:
    """The variance study; its native-size numbers come from the shared pass when there is one
    (`native_pass`: its probe and summary), so only the other sizes read the data again.

    per_class: the shared pass's subsample; every size reads those same images, since a shift
    r(s)/r0 of two image sets measures the sets, not the size."""
    from vitdiag.size_sweep import variance_study

    s = run.settings
    asked = list(sizes)
    held: dict[tuple[int, int], Loader] = {}

    def batches_at(at: LoadedModel, size: tuple[int, int]) -> Loader:
        # Passes A and B at one size read the data alike: one loader (and worker pool) serves
        # both; the previous size's loader is let go so its workers exit.
        key = tuple(size)
        if key not in held:
            held.clear()
            held[key] = loader_for(source, transform_at(at.data_config, s, size), s, per_class)
        return held[key]

    # The native size alone still gives r0 and Var P; naming it keeps the study from noting
    # that it was "added".
    study = variance_study(
        loaded,
        asked or [tuple(loaded.native_size)],
        batches_at=batches_at,
        accuracy=source.labelled,
        native_pass=native_pass,
        interpolations=s.table_interpolations,
        rescales=s.rescales,
        reduction=s.reduction,
        **run.engine_options(),
    )
    out.passes.extend(study.passes)
    if not source.labelled:
        study.notes.append("the data has no labels, so accuracy under each rescale is not shown.")
    if not asked:
        study.notes.append("only the native size was measured: give sizes (--sizes) for shifts.")
    return study.result()
