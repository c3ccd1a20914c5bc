"""`vitdiag calibrate` as a workflow (SPEC §9, temperature scaling, Guo et al. 2017): the logits
of the fit split and of the validation split through the runner's pass machinery, one
temperature fit on the first by a safeguarded Newton method, folded into the classifier
head(s), written as a folder plain timm loads (checked by one reload), and ECE, MCE and NLL
before and after reported on the *other* split with Poisson-bootstrap intervals.

Memory: the fit needs every fit image's logits at once (N×C float64, 8·N·C bytes, plus a few
temporaries of that size while it iterates); the validation split's logits are held the same
way, and its bootstrap keeps N×200 Poisson weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitdiag.errors import VitdiagError
from vitdiag.intervals import (
    BOOTSTRAP,
    REPLICATES,
    Z95,
    interval_record,
    percentile_interval,
    poisson_weights,
    ratio_interval,
)
from vitdiag.probes.base import EVAL, LABELS, LOGITS, Probe, Taps, global_indices
from vitdiag.probes.calibration import bin_edges, calibration_bins, ece_from_bins, mce_from_bins
from vitdiag.results import Result, Table
from vitdiag.studies.timm_folder import (
    FORMATS,
    check_output_path,
    checkpoint_config,
    metadata_str,
    unwritable_note,
    verifier,
    write_checkpoint,
)

if TYPE_CHECKING:
    from vitdiag.data import ImageSource
    from vitdiag.model import LoadedModel
    from vitdiag.settings import Settings

# Fewer errors than this on the fit split: NLL keeps falling as β grows (with no error at all
# it falls for ever), so the optimum is unbounded or set by a handful of images.
MIN_ERRORS = 10
# The bracket on β = 1/T: temperatures from 0.001 to 1000. An optimum outside it means the
# logits carry (almost) no information about the labels (β → 0) or the split is (almost) all
# right (β → ∞); either way the number would not be a temperature to ship.
BETA_MIN, BETA_MAX = 1e-3, 1e3
MAX_STEPS = 200  # bisection alone narrows [1e-3, 1e3] to 1e-13 relative in ~50 steps
STEP_RTOL = 1e-13  # Newton converges quadratically: stop once a step moves β this little
CALIBRATION_JSON = "calibration.json"
DEFINITION = "temperature-scaling-v1"
WALD = "sandwich-wald"  # the temperature's interval: M-estimator variance, Wald on β


# -- the logits of a split ------------------------------------------------------------------


class LogitCollector(Probe):
    """Every labelled image's logits, label and global index, as they stream (a list state,
    concatenated across processes). Not run by `run_all` (order None): it feeds the fit."""

    name = "calibrate-logits"
    order = None
    split = EVAL
    needs_labels = True
    needs = frozenset({LOGITS, LABELS})

    def __init__(self) -> None:
        super().__init__()
        self.add_cat_state("logits")
        self.add_cat_state("labels")
        self.add_cat_state("indices")
        self.seen = 0

    def update(self, taps: Taps) -> None:
        index = global_indices(taps, self.seen)
        self.seen += int(taps.images.shape[0])
        mask = taps.labelled.cpu()
        # float32 as the forward gave them: float64 is made once, for the whole split
        self.logits.append(taps.logits.detach().float().cpu()[mask])
        self.labels.append(taps.targets.detach().cpu().to(torch.int64)[mask])
        self.indices.append(index[mask])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C) float64 logits, (N,) labels, (N,) global indices of the labelled images."""
        if not self.logits:
            return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0).long(), torch.zeros(0)
        return (
            torch.cat(self.logits).to(torch.float64),
            torch.cat(self.labels),
            torch.cat(self.indices).to(torch.int64),
        )

    def compute(self) -> Result:
        return Result(self.name, "logits-v1", {"n": float(sum(len(v) for v in self.labels))})


@dataclasses.dataclass
class Split:
    """One split's logits (float64), labels, global indices and what the pass read."""

    logits: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    data: dict[str, Any]
    notes: list[str]


def split_logits(loaded: LoadedModel, source: ImageSource, s: Settings, option: str) -> Split:
    """One pass of the runner over `source` at the model's size, collecting its logits."""
    from vitdiag.runner import run_pass, transform_at

    if not source.labelled:
        raise VitdiagError(
            f"{option} needs labelled images (class sub-folders), and {source.source} has none."
        )
    probe = LogitCollector()
    label = option.removeprefix("--")
    done = run_pass(
        loaded,
        source,
        [probe],
        dataclasses.replace(s, label=s.label or label),
        transform=transform_at(loaded.data_config, s, loaded.img_size),
        description=label,
    )
    logits, labels, indices = probe.tensors()
    if labels.numel() and int(labels.max()) >= logits.shape[1]:
        raise VitdiagError(
            f"{option} has class index {int(labels.max())} but the model has {logits.shape[1]} "
            "outputs; point it at a dataset with the model's classes."
        )
    return Split(logits, labels, indices, done.data, done.notes)


def check_distinct_splits(fit: str, val: str) -> None:
    """Refuse --fit and --val that are the same images: the same path once resolved (links
    and `..` included), or one folder inside the other. Reporting on the fit split is the
    peers' mistake SPEC §9 names: ECE then looks better than it will on new images."""
    a, b = Path(fit).expanduser(), Path(val).expanduser()
    if a.exists() and b.exists():
        ra, rb = a.resolve(), b.resolve()
        if ra == rb:
            why = "are the same images"
        elif ra in rb.parents or rb in ra.parents:
            why = "overlap (one lies inside the other)"
        else:
            return
    elif fit.strip() != val.strip():
        return
    else:
        why = "are the same images"
    raise VitdiagError(
        f"--fit {fit} and --val {val} {why}; give --val other labelled images, so that the "
        "calibration is measured on images the temperature was not fit to."
    )


# -- the fit --------------------------------------------------------------------------------


def _moments(z: torch.Tensor, zy: torch.Tensor, beta: float) -> tuple[float, float, float, Any]:
    """(NLL, NLL′, NLL″) at β and the per-image NLL′ terms, from row-shifted float64 logits."""
    bz = beta * z
    lse = torch.logsumexp(bz, dim=1)
    p = torch.exp(bz - lse[:, None])
    ez = (p * z).sum(dim=1)
    # Var_p[z] as E_p[(z - E_p z)^2]: never negative, unlike E[z^2] - E[z]^2 in floats
    var = (p * (z - ez[:, None]) ** 2).sum(dim=1)
    g = ez - zy
    return float((lse - beta * zy).mean()), float(g.mean()), float(var.mean()), g


def _bound_error(at: str, errors: int, n: int) -> VitdiagError:
    if at == "max":
        return VitdiagError(
            f"the temperature fit hit its bound T = {1 / BETA_MAX:g}: on the {n} --fit images "
            f"({errors} wrong) the NLL still falls as T shrinks, so no finite temperature fits; "
            "fit on held-out images the model gets wrong more often (not its training data)."
        )
    return VitdiagError(
        f"the temperature fit hit its bound T = {1 / BETA_MIN:g}: on the {n} --fit images "
        f"({errors} wrong) the NLL still falls as T grows, i.e. the logits carry almost no "
        "information about these labels; check that --fit has the model's classes in its "
        "output order."
    )


def fit_temperature(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta_min: float = BETA_MIN,
    beta_max: float = BETA_MAX,
    min_errors: int = MIN_ERRORS,
) -> tuple[float, dict[str, Any]]:
    """β = 1/T minimising NLL(β) = mean(logsumexp(β z) − β z_y), by Newton's method on the
    convex NLL (NLL′ = mean(E_pβ[z] − z_y), NLL″ = mean(Var_pβ[z]) ≥ 0) kept inside a bracket
    that starts as [beta_min, beta_max] and shrinks to the side of each step where NLL′
    changes sign; a step that leaves it (or a zero curvature) bisects it geometrically.

    Float64 throughout, on the whole (N, C) logits. Refused (VitdiagError): fewer than
    `min_errors` wrong images, or an optimum at a bound (NLL′ < 0 at beta_max or > 0 at
    beta_min). info: the fit's diagnostics and the temperature's sandwich standard error."""
    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    y = torch.as_tensor(labels).detach().to("cpu", torch.int64)
    n = int(y.numel())
    errors = int((z.argmax(dim=1) != y).sum()) if n else 0
    if errors < min_errors:
        raise VitdiagError(
            f"the model gets only {errors} of the {n} --fit images wrong (fewer than "
            f"{min_errors}): the NLL keeps falling as T → 0, so no temperature can be fit; give "
            f"--fit held-out images it gets wrong at least {min_errors} times."
        )
    # shifting each row by its largest logit changes neither p_β nor E_p[z] − z_y
    z = z - z.max(dim=1, keepdim=True).values
    zy = z.gather(1, y[:, None])[:, 0]
    if _moments(z, zy, beta_max)[1] < 0:
        raise _bound_error("max", errors, n)
    if _moments(z, zy, beta_min)[1] > 0:
        raise _bound_error("min", errors, n)
    lo, hi, beta = beta_min, beta_max, min(max(1.0, beta_min), beta_max)
    newton = bisections = 0
    converged = False
    for _ in range(MAX_STEPS):
        _, g, h, _ = _moments(z, zy, beta)
        if g == 0:
            converged = True
            break
        step = beta - g / h if h > 0 else math.nan
        if abs(step - beta) <= STEP_RTOL * beta:  # before the bracket test: step may sit on it
            beta, converged = step, True
            break
        lo, hi = (lo, beta) if g > 0 else (beta, hi)
        if lo < step < hi:
            newton += 1
        else:
            step, bisections = math.sqrt(lo * hi), bisections + 1
        beta = step
        if hi - lo <= STEP_RTOL * beta:
            converged = True
            break
    if not converged:  # Newton in a shrinking bracket, else bisection: this would be a bug
        raise VitdiagError(
            f"the temperature fit did not converge in {MAX_STEPS} steps (β = {beta:g}); "
            "please report this vitdiag bug with the --fit data's size."
        )
    nll, g, h, terms = _moments(z, zy, beta)
    # M-estimator (sandwich) variance of β̂: Var(per-image NLL′) / (N · NLL″²)
    se_beta = math.sqrt(float(terms.var()) / n) / h if n > 1 and h > 0 else math.nan
    info = {
        "n": n,
        "errors": errors,
        "beta": beta,
        "nll_before": _moments(z, zy, 1.0)[0],
        "nll_after": nll,
        "gradient": g,
        "curvature": h,
        "newton_steps": newton,
        "bisections": bisections,
        "converged": converged,
        "bracket": [beta_min, beta_max],
        "se_beta": se_beta,
        "se_temperature": se_beta / beta**2,
    }
    return beta, info


def temperature_interval(beta: float, se_beta: float) -> tuple[float, float]:
    """95 % Wald interval on β mapped to T = 1/β (an upper end of ∞ when it reaches β ≤ 0)."""
    lo_b, hi_b = beta - Z95 * se_beta, beta + Z95 * se_beta
    return 1.0 / hi_b, (1.0 / lo_b if lo_b > 0 else math.inf)


# -- folding and writing --------------------------------------------------------------------


def head_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of each linear classifier head, found as `probes.classifier`'s
    `classifier_heads` finds them: timm's `get_classifier()` (a tuple for a distilled DeiT:
    head, head_dist), the `.fc` inside timm's ClassifierHead."""
    clf = model.get_classifier()
    modules = list(clf) if isinstance(clf, (tuple, list)) else [clf]
    names = {id(m): k for k, m in model.named_modules()}
    heads = []
    for module in modules:
        fc = module
        if not isinstance(fc, (nn.Linear, nn.Conv2d)) and isinstance(
            getattr(fc, "fc", None), nn.Module
        ):
            fc = fc.fc
        linear = isinstance(fc, nn.Linear) or (
            isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1
        )
        if not linear:
            raise VitdiagError(
                f"the model's classifier is a {type(fc).__name__}, not a linear layer, so the "
                "temperature cannot be folded into it; load the checkpoint with its head."
            )
        heads.append((names.get(id(fc), "head"), fc))
    return heads


def fold_temperature(model: nn.Module, beta: float) -> list[str]:
    """W' = βW, b' = βb in every classifier head, in place: β(Wh + b) = (βW)h + βb, so the
    logits become β times what they were and no argmax changes. The heads' names."""
    heads = head_layers(model)
    with torch.no_grad():
        for _, layer in heads:
            # the product in float64, rounded once to the layer's dtype
            layer.weight.copy_(layer.weight.double() * beta)
            if layer.bias is not None:
                layer.bias.copy_(layer.bias.double() * beta)
    return [name for name, _ in heads]


class _Scaled(nn.Module):
    """β × the original model's logits: what the folded, written model must reproduce."""

    def __init__(self, model: nn.Module, beta: float) -> None:
        super().__init__()
        self.inner, self.beta = model, beta
        # the reload check restores the mode it found on this wrapper: make it the model's
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.beta


def write_calibrated(
    loaded: LoadedModel,
    folded: nn.Module,
    beta: float,
    out: Path,
    doc: dict[str, Any],
    prov: dict[str, Any],
    *,
    fmt: str,
    force: bool,
    seed: int,
) -> tuple[Path, float]:
    """Write the folded model (config.json + weights) and calibration.json through one
    temporary folder. Its one reload through plain timm is compared with β × the *original*
    model's logits, so the check covers the fold and the writing together; the folder takes
    OUT's name only after it passed. (written folder, largest logit difference)."""
    diffs: list[float] = []
    check = verifier(_Scaled(loaded.model, beta), tuple(loaded.img_size), seed, diffs)

    def verify_and_finish(folder: Path) -> None:
        check(folder)
        doc["reload_max_abs_diff"] = diffs[0]
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
        (folder / CALIBRATION_JSON).write_text(text, encoding="utf-8")

    written = write_checkpoint(
        folded,
        out,
        config=checkpoint_config(loaded, loaded.img_size, metadata_str(prov)),
        metadata=metadata_str({"format": "pt", **prov}),
        fmt=fmt,
        source=(loaded.provenance or {}).get("path"),
        force=force,
        verify=verify_and_finish,
    )
    return written, diffs[0]


# -- before and after on the validation split -------------------------------------------------


def _nll_terms(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z, dim=1) - z.gather(1, y[:, None])[:, 0]


def weighted_bins(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bins, R) weighted count, Σ confidence, Σ correct: `calibration_bins` per replicate,
    with the same (lower, upper] bins of top-label confidence."""
    logp = torch.log_softmax(z, dim=1)
    top, pred = logp.max(dim=1)
    conf = top.exp()
    idx = (torch.bucketize(conf, bin_edges(n_bins), right=False) - 1).clamp_(0, n_bins - 1)
    onehot = torch.nn.functional.one_hot(idx, n_bins).to(torch.float64)  # (N, bins)
    correct = (pred == y).to(torch.float64)
    return onehot.T @ w, onehot.T @ (conf[:, None] * w), onehot.T @ (correct[:, None] * w)


def _replicate_errors(
    counts: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) ECE and MCE of each replicate from its weighted bins (NaN where all weights are 0)."""
    gap = (correct - conf).abs()
    total = counts.sum(dim=0)
    ece = torch.where(total > 0, gap.sum(dim=0) / total.clamp_min(1e-300), math.nan)
    per_bin = torch.where(counts > 0, gap / counts.clamp_min(1e-300), -math.inf)
    mce = per_bin.max(dim=0).values
    return ece, torch.where(torch.isfinite(mce), mce, math.nan)


def before_after(
    logits: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    beta: float,
    *,
    seed: int,
    n_bins: int = 15,
    replicates: int = REPLICATES,
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """ECE, MCE and NLL of `logits` and of β·`logits` (what the folded model gives, up to float
    rounding), with 95 % Poisson-bootstrap intervals: image i's weights are keyed by (seed,
    its global index, replicate), the same for before and after, so a change is paired."""
    z = torch.as_tensor(logits).to(torch.float64)
    y = torch.as_tensor(labels).to(torch.int64)
    w = poisson_weights(seed, indices, replicates)
    metrics: dict[str, float] = {}
    intervals: dict[str, dict[str, Any]] = {}
    reps: dict[str, torch.Tensor] = {}
    for when, zz in (("before", z), ("after", beta * z)):
        bins = calibration_bins(zz, y, n_bins)
        nll = _nll_terms(zz, y)
        metrics[f"ece_{when}"] = ece_from_bins(*bins)
        metrics[f"mce_{when}"] = mce_from_bins(*bins)
        metrics[f"nll_{when}"] = float(nll.mean())
        ece_r, mce_r = _replicate_errors(*weighted_bins(zz, y, w, n_bins))
        nll_r = (nll[:, None] * w).sum(dim=0) / w.sum(dim=0)
        reps.update({f"ece_{when}": ece_r, f"mce_{when}": mce_r, f"nll_{when}": nll_r})
        intervals[f"nll_{when}"] = interval_record(
            *ratio_interval((nll[:, None] * w).sum(dim=0), w.sum(dim=0)), BOOTSTRAP
        )
        for key in (f"ece_{when}", f"mce_{when}"):
            intervals[key] = interval_record(*percentile_interval(reps[key]), BOOTSTRAP)
    for what in ("ece", "mce", "nll"):
        key = f"{what}_change"
        metrics[key] = metrics[f"{what}_after"] - metrics[f"{what}_before"]
        change = reps[f"{what}_after"] - reps[f"{what}_before"]
        intervals[key] = interval_record(*percentile_interval(change), BOOTSTRAP)
    metrics["accuracy"] = float((z.argmax(dim=1) == y).double().mean()) if y.numel() else math.nan
    return metrics, intervals


# -- the whole of `vitdiag calibrate` ----------------------------------------------------------


@dataclasses.dataclass
class CalibrateOutcome:
    out: Path
    beta: float
    temperature: float
    heads: list[str]
    document: dict[str, Any]  # what OUT/calibration.json holds
    result: Result


def calibrate(
    loaded: LoadedModel,
    fit_source: ImageSource,
    val_source: ImageSource,
    out: Path,
    *,
    settings: Settings,
    fmt: str = "safetensors",
    force: bool = False,
) -> CalibrateOutcome:
    """Fit T on `fit_source`, fold it into the head(s), write OUT (config.json, weights and
    calibration.json) and report ECE, MCE and NLL on `val_source` before and after.

    `loaded` is not changed: the fold is made on a copy. The validation numbers after come from
    β × the logits of one pass (the fold is exact up to float rounding); the written folder is
    reloaded once through plain timm and compared with β × the original model."""
    from vitdiag.results import jsonable

    if fmt not in FORMATS:
        raise VitdiagError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    check_output_path(out, (loaded.provenance or {}).get("path"), force)
    head_layers(loaded.model)  # a head the fold cannot take is refused before any pass
    s = settings
    fit = split_logits(loaded, fit_source, s, "--fit")
    beta, info = fit_temperature(fit.logits, fit.labels)
    fit.logits = torch.zeros(0)  # the N×C fit logits are not needed any more
    val = split_logits(loaded, val_source, s, "--val")
    metrics, intervals = before_after(
        val.logits, val.labels, val.indices, beta, seed=s.seed, n_bins=s.bins
    )
    intervals["temperature"] = interval_record(*temperature_interval(beta, info["se_beta"]), WALD)
    folded = copy.deepcopy(loaded.model)
    heads = fold_temperature(folded, beta)
    prov = _provenance(loaded, beta, heads, fit.data, val.data)
    doc = jsonable(
        {
            "temperature": 1.0 / beta,
            **metrics,
            "n_fit": info["n"],
            "n_val": int(val.labels.numel()),
            "errors_fit": info["errors"],
            "intervals": intervals,
            "beta": beta,
            "heads": heads,
            "n_bins": s.bins,
            "definition": DEFINITION,
            "fit": {**info, "data": fit.data},
            "val": {"data": val.data},
            "provenance": prov,
        }
    )
    written, diff = write_calibrated(
        _as_measured(loaded, s), folded, beta, out, doc, prov, fmt=fmt, force=force, seed=s.seed
    )
    notes = [*_notes(written, fmt, diff, doc), *unwritable_note(loaded), *fit.notes, *val.notes]
    result = Result(
        probe="calibrate",
        definition=DEFINITION,
        metrics={k: float(v) for k, v in doc.items() if isinstance(v, (int, float))},
        tables=[_table(doc)],
        notes=list(dict.fromkeys(notes)),
        extra={"out": str(written), "calibration": doc},
    )
    return CalibrateOutcome(Path(written), beta, 1.0 / beta, heads, doc, result)


def _as_measured(loaded: LoadedModel, s: Settings) -> LoadedModel:
    """The model with the preprocessing the fit used (--mean, --std, --interpolation,
    --crop-pct) in its data config, so config.json tells timm to feed it the same images: the
    temperature is only right for them. The model itself is shared, not copied."""
    given = {"mean": s.mean, "std": s.std, "interpolation": s.interpolation}
    given["crop_pct"] = s.crop_pct
    overrides = {k: (list(v) if isinstance(v, tuple) else v) for k, v in given.items() if v}
    return dataclasses.replace(loaded, data_config={**(loaded.data_config or {}), **overrides})


def _provenance(
    loaded: LoadedModel, beta: float, heads: list[str], fit: dict, val: dict
) -> dict[str, Any]:
    """What the written checkpoint records (safetensors metadata and config.json)."""
    import timm

    from vitdiag import __version__

    path = (loaded.provenance or {}).get("path")
    return {
        "vitdiag_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "source_path": str(Path(path).resolve()) if path else "(random weights)",
        "source_sha256": str((loaded.provenance or {}).get("sha256") or ""),
        "source_arch": loaded.arch,
        "remedy": "temperature-scaling",
        "temperature": 1.0 / beta,
        "beta": beta,
        "folded_into": ",".join(heads),
        "fit_data": str(fit.get("source")),
        "n_fit": int(fit.get("n_images") or 0),
        "val_data": str(val.get("source")),
    }


def _cell(doc: dict[str, Any], key: str) -> str:
    iv = doc["intervals"].get(key)
    value = doc[key]
    if iv is None or iv["lo"] is None:
        return f"{value:.4g}"
    hi = "∞" if iv["hi"] is None else f"{iv['hi']:.3g}"
    return f"{value:.4g} [{iv['lo']:.3g}, {hi}]"


def _table(doc: dict[str, Any]) -> Table:
    fit, val = doc["fit"], doc["val"]["data"]
    title = (
        f"Temperature scaling: T fit on {fit['data'].get('source')} ({doc['n_fit']} images, "
        f"{doc['errors_fit']} wrong), measured on {val.get('source')} ({doc['n_val']} images; "
        "95 % intervals)"
    )
    rows: list[list[Any]] = [["temperature T", 1.0, _cell(doc, "temperature"), ""]]
    for what, label in (("ece", "ECE"), ("mce", "MCE"), ("nll", "NLL")):
        rows.append(
            [
                label,
                _cell(doc, f"{what}_before"),
                _cell(doc, f"{what}_after"),
                _cell(doc, f"{what}_change"),
            ]
        )
    rows.append(["top-1 (unchanged)", doc["accuracy"], doc["accuracy"], 0.0])
    return Table(title, ["", "before", "after", "change"], rows)


def _notes(written: Path, fmt: str, diff: float, doc: dict[str, Any]) -> list[str]:
    weights = "model.safetensors" if fmt == "safetensors" else "model.pth"
    notes = [
        f"wrote {written}/ (config.json + {weights} + {CALIBRATION_JSON}): the temperature is "
        f"folded into {', '.join(doc['heads'])} (W' = W/T, b' = b/T); plain timm loads it with "
        f"timm.create_model('local-dir:{written}', pretrained=True); checked: its logits differ "
        f"from the original model's divided by T by at most {diff:.2g}.",
        f"the fit held the {doc['n_fit']} --fit images' logits in memory as float64 "
        f"({doc['fit']['newton_steps']} Newton steps, {doc['fit']['bisections']} bisections "
        f"in T ∈ [{1 / BETA_MAX:g}, {1 / BETA_MIN:g}]).",
    ]
    if doc["ece_change"] > 0:
        notes.append(
            "ECE on --val rose: the --fit images are not like the --val images (e.g. harder), "
            "so the temperature that fits them does not carry over; fit on images like those "
            "the model will see."
        )
    return notes
