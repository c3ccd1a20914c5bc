"""Closed loop: do vitdiag's remedies move the metrics they target?

Trains fixture-size ViTs (the architecture, data and recipe of ``fixtures/make_fixtures.py``)
with and without each remedy on ``fixtures/data/train``, re-diagnoses each with vitdiag on the
held-out ``fixtures/data/val`` (the results document and its findings, as `vitdiag report`
writes them) and prints one markdown row per variant:

1. baseline: the no-mix recipe of ``vit_nomix`` (trained by make_fixtures' own `train_variant`);
2. + calibrate: `vitdiag.studies.calibrate` (T fit on train) on a base with >= 10 train errors:
   the baseline if it has them, else the CutMix recipe (the row says which);
3. + DiversePatch: patch_cosine_loss + patch_contrastive_loss, weight 1 each, while training;
4. + fixed simplex-ETF head: install_fixed_etf_head before training;
5. + fix-posembed at 48 px (trained at 32): the baseline's table resampled and rescaled.

    python experiments/closed_loop.py [--quick] [--epochs N] [--out DIR]

`--out DIR` writes DIR/closed_loop.md (the table) and DIR/closed_loop.json (every number);
without it the table goes to stdout. `--quick` trains 1 epoch and diagnoses 64 images, to
exercise all five variants end to end in seconds; its numbers mean nothing.

Every diagnosis reads only the val split (as both --data and --val), so P(h) and NC1 are
measured on held-out images too, unlike `vitdiag report --data train --val val`. The probes are
those a remedy targets or a finding reads (PROBES); invariance and mixup geometry are left out:
they cost most of a report's time and no remedy here aims at them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The fixture recipe lives in fixtures/make_fixtures.py, which is a script, not a package
# module: put the repository root on the path so it imports as `fixtures.make_fixtures`.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROBES = "eval,calibration,similarity,collapse,classifier,variance"
NEW_SIZE = 48
RESCALE = "empirical"  # fix-posembed's default: c measured on the images
MIN_ERRORS = 10  # what vitdiag.studies.calibrate demands on its fit split
_NUM = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


@dataclasses.dataclass
class Recipe:
    """What one run of the experiment trains and measures."""

    epochs: int
    limit: int | None  # images per diagnosis pass (None: all)
    reference_images: int
    seed: int
    workers: int
    data: Path
    work: Path

    @property
    def train(self) -> Path:
        return self.data / "train"

    @property
    def val(self) -> Path:
        return self.data / "val"

    def settings(self) -> Any:
        from vitdiag.settings import Settings

        return Settings(
            workers=self.workers,
            limit=self.limit,
            seed=self.seed,
            quiet=True,
            reference_images=self.reference_images,
        )


# -- training ---------------------------------------------------------------------------------


def _train_transform(cfg: dict) -> Any:
    """make_fixtures' training transform (random resized crop + flip at 32 px)."""
    import timm.data

    from fixtures import make_fixtures as mf

    size = mf.MODEL_ARGS["img_size"]
    return timm.data.create_transform(
        input_size=(3, size, size),
        is_training=True,
        scale=tuple(cfg["scale"]),
        ratio=tuple(cfg["ratio"]),
        hflip=cfg["hflip"],
        color_jitter=None,
        interpolation=mf.INTERPOLATION,
        mean=mf.MEAN,
        std=mf.STD,
        re_prob=cfg["reprob"],
        re_mode=cfg["remode"],
        re_count=cfg["recount"],
    )


def train_with_remedy(
    name: str, train_set: Any, recipe: Recipe, *, etf: bool = False, diverse: bool = False
) -> tuple[Any, dict]:
    """make_fixtures.train_variant's no-mix loop with a remedy switched on.

    The loop is mirrored rather than imported because train_variant has no hook for extra
    losses or a frozen head; it draws the random numbers in the same order (seed, build, epoch
    permutations, transforms), so with both remedies off it reproduces the baseline, and the
    remedies themselves draw none (the ETF's QR has its own generator).
    """
    import torch
    from PIL import Image

    import vitdiag.train as vt
    from fixtures import make_fixtures as mf

    cfg = {**mf.TRAIN, **mf.VARIANTS["vit_nomix"], "epochs": recipe.epochs}
    mf.seed_everything(recipe.seed)
    model = mf.build_model(len(train_set.classes))
    if etf:
        vt.install_fixed_etf_head(model)  # before the optimizer: the frozen W is not a Parameter
    tf = _train_transform(cfg)
    images = [Image.open(p).convert("RGB") for p, _ in train_set.samples]
    labels = torch.tensor(train_set.targets)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg["smoothing"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    bs = cfg["batch_size"]
    steps_per_epoch = len(images) // bs
    total, warmup = steps_per_epoch * cfg["epochs"], steps_per_epoch * cfg["warmup_epochs"]
    gen = torch.Generator().manual_seed(recipe.seed)
    t0, step, parts = time.perf_counter(), 0, {}
    model.train()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(images), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * bs : (b + 1) * bs]
            x = torch.stack([tf(images[i]) for i in idx.tolist()])
            for g in opt.param_groups:
                g["lr"] = mf.lr_at(step, total, warmup, cfg["lr"], cfg["min_lr"])
            if diverse:
                out = vt.forward_tokens(model, x)
                terms = {
                    "ce": criterion(out.logits, labels[idx]),
                    "cos": vt.patch_cosine_loss(out.last),
                    "contrastive": vt.patch_contrastive_loss(out.first, out.last),
                }
            else:
                terms = {"ce": criterion(model(x), labels[idx])}
            loss = sum(terms.values())  # α₁ = α₂ = 1, as Gong et al. train
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
            opt.step()
            step += 1
            # the last epoch's mean of each loss term, for the JSON
            if step > total - steps_per_epoch:
                for k, v in terms.items():
                    parts[k] = parts.get(k, 0.0) + float(v.detach()) / steps_per_epoch
    model.eval()
    cfg.update(train_time_s=round(time.perf_counter() - t0, 2), steps=total, last_epoch=parts)
    print(f"  trained {name}: {cfg['train_time_s']:.0f}s", file=sys.stderr, flush=True)
    return model, cfg


def train_fixture_recipe(name: str, mix: str, train_set: Any, recipe: Recipe) -> tuple:
    """A fixture recipe (vit_nomix, vit_cutmix) through make_fixtures' own train_variant."""
    from fixtures import make_fixtures as mf

    # its progress lines go to stderr: stdout carries only the table
    with contextlib.redirect_stdout(sys.stderr):
        return mf.train_variant(
            name, {**mf.VARIANTS[mix], "epochs": recipe.epochs}, train_set, recipe.seed
        )


def fixture_difference(model: Any, recipe: Recipe, fixture: str = "vit_nomix") -> float | None:
    """Largest |weight difference| to the committed fixture model trained by the same recipe
    (None when the schedule differs): 0 says the baseline row is the shipped vit_nomix."""
    from safetensors.torch import load_file

    from fixtures import make_fixtures as mf

    path = ROOT / "fixtures" / "models" / fixture / "model.safetensors"
    if recipe.epochs != mf.TRAIN["epochs"] or recipe.seed != mf.SEED or not path.exists():
        return None
    shipped, ours = load_file(str(path)), model.state_dict()
    return max(float((ours[k].float() - v.float()).abs().max()) for k, v in shipped.items())


def save(model: Any, name: str, train_set: Any, recipe: Recipe) -> Path:
    """The trained model as a timm local-dir folder (make_fixtures' save_model), so the remedy
    workflows and vitdiag.load read it as they read any checkpoint."""
    from fixtures import make_fixtures as mf

    folder = recipe.work / name
    mf.save_model(model, folder, list(train_set.classes), name)
    return folder


# -- diagnosis --------------------------------------------------------------------------------


def diagnose(folder: Path, name: str, recipe: Recipe, sizes: list[int] | None = None) -> dict:
    """The results document `vitdiag report` would write for the checkpoint, findings
    included, with every diagnosis probe on the held-out split."""
    import vitdiag
    from vitdiag.model import describe
    from vitdiag.report import Entry, report_document
    from vitdiag.runner import run_all

    loaded = vitdiag.load(str(folder))
    probes = PROBES if sizes else PROBES.replace(",variance", "")
    res = run_all(
        loaded,
        str(recipe.val),
        val_source=str(recipe.val),
        probes=probes,
        sizes=sizes,
        settings=recipe.settings(),
    )
    doc = report_document([Entry(name, describe(loaded), res)], dict(res.data), res.seconds, 1)
    print(f"  diagnosed {name}: {res.seconds:.0f}s", file=sys.stderr, flush=True)
    return doc


def _result(doc: dict, probe: str) -> dict:
    for r in doc["results"]:
        if r["probe"] == probe:
            return r
    raise KeyError(f"the results document has no {probe} result")


def reading(doc: dict, probe: str, key: str) -> dict:
    """A metric with its interval from the results document (lo/hi None where it has none)."""
    r = _result(doc, probe)
    iv = ((r.get("extra") or {}).get("intervals") or {}).get(key) or {}
    return {
        "value": r["metrics"].get(key),
        "lo": iv.get("lo"),
        "hi": iv.get("hi"),
        "method": iv.get("method"),
    }


def reference(doc: dict, probe: str, name: str) -> dict:
    ref = ((_result(doc, probe).get("extra") or {}).get("references") or {}).get(name) or {}
    lo, hi = ref.get("interval") or (None, None)
    return {"value": ref.get("value"), "lo": lo, "hi": hi, "how": ref.get("how")}


def numbers(doc: dict) -> dict:
    """Every number of the document: each probe's metrics, intervals and references, and the
    findings (the tables and notes repeat them in words)."""
    out = {}
    for r in doc["results"]:
        extra = r.get("extra") or {}
        out[r["probe"]] = {
            "metrics": r["metrics"],
            "intervals": extra.get("intervals") or {},
            "references": extra.get("references") or {},
        }
    return {"results": out, "findings": doc["findings"]["items"], "seconds": doc["run"]["seconds"]}


def fired(doc: dict) -> list[str]:
    return [f"{f['rule']} ({f['severity']})" for f in doc["findings"]["items"]]


# -- the remedies that act on a trained checkpoint --------------------------------------------


def calibrated(folder: Path, name: str, recipe: Recipe) -> Any:
    """`vitdiag calibrate`: T fit on the training split, ECE before/after on val (raises
    VitdiagError, as the command refuses, when the fit split has fewer than 10 errors)."""
    import vitdiag
    from vitdiag.runner import open_source
    from vitdiag.studies.calibrate import calibrate

    s = recipe.settings()
    return calibrate(
        vitdiag.load(str(folder)),
        open_source(str(recipe.train), s),
        open_source(str(recipe.val), s),
        recipe.work / f"{name}_calibrated",
        settings=s,
    )


def rescaled(folder: Path, recipe: Recipe) -> Any:
    """`vitdiag fix-posembed --size 48 --rescale empirical --data val`: c measured on val."""
    import vitdiag
    from vitdiag.runner import Runtime, loader_for, open_source, transform_at
    from vitdiag.studies.fix_posembed import fix_posembed

    s = recipe.settings()
    source = open_source(str(recipe.val), s)

    def batches_at(at: Any, size: Any) -> Any:
        return loader_for(source, transform_at(at.data_config, s, size), s)

    return fix_posembed(
        vitdiag.load(str(folder)),
        NEW_SIZE,
        recipe.work / f"baseline_{NEW_SIZE}",
        rescale=RESCALE,
        batches_at=batches_at,
        accuracy=True,
        total_images=min(len(source), s.limit or len(source)),
        **Runtime(s).engine_options(),
    )


# -- the table ----------------------------------------------------------------------------------


def num(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return "inf" if math.isinf(v) else f"{v:.{digits}g}"


def cell(r: dict) -> str:
    """value [lo, hi], or the value and why there is no interval."""
    if r.get("lo") is None or r.get("hi") is None:
        return f"{num(r['value'])} (no interval)"
    return f"{num(r['value'])} [{num(r['lo'], 3)}, {num(r['hi'], 3)}]"


def disjoint(a: dict, b: dict) -> bool:
    """Two 95 % intervals that do not overlap (False where either is missing)."""
    if None in (a.get("lo"), a.get("hi"), b.get("lo"), b.get("hi")):
        return False
    return a["hi"] < b["lo"] or b["hi"] < a["lo"]


def moved(before: dict, after: dict, what: str) -> str:
    """In words: did `what` move from before to after beyond both intervals?"""
    if not disjoint(before, after):
        return f"{what} did not move detectably (the intervals overlap)"
    way = "fell" if after["value"] < before["value"] else "rose"
    return f"{what} {way} ({num(before['value'], 3)} → {num(after['value'], 3)}, intervals apart)"


def row(variant: str, metric: str, doc: dict, verdict: str, top1: dict | None = None) -> dict:
    items = fired(doc)
    return {
        "variant": variant,
        "metric": metric,
        "findings": ", ".join(f"`{f}`" for f in items) if items else "none",
        "top1": cell(top1 or reading(doc, "eval", "top1")),
        "verdict": verdict,
    }


COLUMNS = {
    "variant": "variant",
    "metric": "targeted metric on val: before → after [95 %]",
    "findings": "findings that fired (rule, severity)",
    "top1": "top-1 on val [95 %]",
    "verdict": "did it move?",
}


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]).replace("|", "/") for k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def paired(what: str, change: dict) -> str:
    """In words: does a paired change's interval exclude 0?"""
    lo, hi = change.get("lo"), change.get("hi")
    span = f"{num(change['value'], 3)} [{num(lo, 3)}, {num(hi, 3)}]"
    if lo is not None and lo > 0:
        return f"{what} rose: paired change {span}"
    if hi is not None and hi < 0:
        return f"{what} fell: paired change {span}"
    return f"{what} did not move detectably: paired change {span} includes 0"


def iv_of(doc: dict, key: str) -> dict:
    """A value and its interval from a workflow document (calibration.json's layout)."""
    iv = doc["intervals"].get(key) or {}
    return {"value": doc[key], "lo": iv.get("lo"), "hi": iv.get("hi")}


def baseline_row(doc: dict, epochs: int) -> dict:
    ece, ph = reading(doc, "calibration", "ece"), reading(doc, "similarity", "last_block")
    etf, nc1 = reading(doc, "classifier", "w_etf"), reading(doc, "collapse", "nc1")
    metric = (
        f"reference row: ECE {cell(ece)}; last-block P(h) {cell(ph)}; "
        f"ETF distance {cell(etf)}; NC1 {cell(nc1)}"
    )
    plural = "s" if epochs != 1 else ""
    return row(f"1. baseline (no mix, {epochs} epoch{plural})", metric, doc, "—")


def calibrate_row(base: str, why: str, base_doc: dict, doc: dict, outcome: Any) -> dict:
    before, after = reading(base_doc, "calibration", "ece"), reading(doc, "calibration", "ece")
    cal = outcome.document
    metric = f"ECE {cell(before)} → {cell(after)}; T = {cell(iv_of(cal, 'temperature'))}"
    verdict = paired("ECE", iv_of(cal, "ece_change"))
    return row(f"2. + calibrate (base: {base}{why})", metric, doc, verdict)


def diverse_row(base_doc: dict, doc: dict) -> dict:
    before, after = (reading(d, "similarity", "last_block") for d in (base_doc, doc))
    init = reference(doc, "similarity", "random_init")
    metric = f"last-block P(h) {cell(before)} → {cell(after)}; random init {cell(init)}"
    if disjoint(after, init):
        side = "below" if after["value"] < init["value"] else "above"
        against = f"{side} random init (intervals apart)"
    else:
        against = "not distinguishable from random init (intervals overlap)"
    verdict = f"{moved(before, after, 'P(h)')}; {against}"
    return row("3. + DiversePatch losses (cos + contrastive, α = 1)", metric, doc, verdict)


def etf_row(base_doc: dict, doc: dict) -> dict:
    etf = [reading(d, "classifier", "w_etf") for d in (base_doc, doc)]
    nc1 = [reading(d, "collapse", "nc1") for d in (base_doc, doc)]
    heads = reference(doc, "classifier", "gaussian_heads")
    metric = (
        f"ETF distance {num(etf[0]['value'])} → {num(etf[1]['value'])} (a function of the "
        f"weights, no interval; Gaussian heads {cell(heads)}); NC1 {cell(nc1[0])} → {cell(nc1[1])}"
    )
    way = "fell" if etf[1]["value"] < etf[0]["value"] else "rose"
    verdict = f"ETF distance {way} (the head is an ETF by construction); {moved(*nc1, 'NC1')}"
    return row("4. + fixed simplex-ETF head", metric, doc, verdict)


def posembed_row(base_doc: dict, doc: dict, outcome: Any) -> dict:
    none = reading(base_doc, "variance", f"top1@{NEW_SIZE}/none")
    with_c = reading(base_doc, "variance", f"top1@{NEW_SIZE}/{RESCALE}")
    gain = reading(base_doc, "variance", f"gain@{NEW_SIZE}/{RESCALE}")
    c = outcome.c
    metric = (
        f"top-1@{NEW_SIZE}: without rescale {num(none['value'])} → {RESCALE} (c = {num(c)}) "
        f"{num(with_c['value'])}; paired gain {cell(gain)}"
    )
    verdict = paired(f"top-1@{NEW_SIZE}", gain)
    return row(f"5. + fix-posembed at {NEW_SIZE} px ({RESCALE})", metric, doc, verdict)


# -- the experiment -----------------------------------------------------------------------------


FIXTURE_OF = {"baseline": "vit_nomix", "cutmix": "vit_cutmix"}  # the recipes they share


class Loop:
    """Trains, saves and diagnoses the variants; `record` collects every number for the JSON."""

    def __init__(self, recipe: Recipe) -> None:
        import torchvision

        self.recipe = recipe
        self.train_set = torchvision.datasets.ImageFolder(str(recipe.train))
        self.record: dict[str, Any] = {}

    def trained(self, name: str, model_cfg: tuple, sizes: list[int] | None = None) -> tuple:
        model, cfg = model_cfg
        if name in FIXTURE_OF:
            diff = fixture_difference(model, self.recipe, FIXTURE_OF[name])
            cfg["max_abs_diff_to_fixture"] = diff
        folder = save(model, name, self.train_set, self.recipe)
        doc = diagnose(folder, name, self.recipe, sizes)
        self.record[name] = {"train": cfg, "diagnosis": numbers(doc)}
        return folder, doc

    def fixture(self, name: str, mix: str) -> tuple:
        return train_fixture_recipe(name, mix, self.train_set, self.recipe)

    def remedy(self, name: str, **switch: bool) -> tuple:
        return train_with_remedy(name, self.train_set, self.recipe, **switch)

    def calibrate(self, base_dir: Path, base_doc: dict) -> dict:
        """Row 2: the baseline if calibrate accepts it, else the CutMix recipe (trained here)."""
        from vitdiag.errors import VitdiagError

        key, base, why = "baseline", "baseline", ""
        try:
            outcome = calibrated(base_dir, "baseline", self.recipe)
        except VitdiagError as e:
            if f"(fewer than {MIN_ERRORS})" not in str(e):
                raise
            refused = str(e).split(":")[0]
            why = f"; the no-mix baseline was refused: {refused}"
            folder, base_doc = self.trained("cutmix", self.fixture("cutmix", "vit_cutmix"))
            key, base = "cutmix", "the CutMix recipe"
            outcome = calibrated(folder, "cutmix", self.recipe)
        doc = diagnose(outcome.out, "calibrated", self.recipe)
        self.record["calibrated"] = {
            "base": key,
            "refused": why.removeprefix("; ") or None,
            "calibrate": outcome.document,
            "diagnosis": numbers(doc),
        }
        return calibrate_row(base, why, base_doc, doc, outcome)

    def posembed(self, base_dir: Path, base_doc: dict) -> dict:
        outcome = rescaled(base_dir, self.recipe)
        doc = diagnose(outcome.out, f"baseline_{NEW_SIZE}", self.recipe)
        self.record[f"baseline_{NEW_SIZE}"] = {
            "fix_posembed": {"c": outcome.c, "method": outcome.method, **outcome.result.metrics},
            "diagnosis": numbers(doc),
        }
        return posembed_row(base_doc, doc, outcome)

    def run(self) -> list[dict]:
        base_dir, base = self.trained("baseline", self.fixture("baseline", "vit_nomix"), [NEW_SIZE])
        rows = [baseline_row(base, self.recipe.epochs), self.calibrate(base_dir, base)]
        _, doc = self.trained("diverse", self.remedy("diverse", diverse=True))
        rows.append(diverse_row(base, doc))
        _, doc = self.trained("etf", self.remedy("etf", etf=True))
        rows.append(etf_row(base, doc))
        rows.append(self.posembed(base_dir, base))
        return rows


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 epoch, 64 images: a smoke run")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 20)")
    p.add_argument("--out", type=Path, default=None, help="folder for closed_loop.md/.json")
    p.add_argument("--data", type=Path, default=ROOT / "fixtures" / "data")
    p.add_argument("--seed", type=int, default=0)
    # One intra-op thread, as make_fixtures: on a shared 2-core machine two threads spin.
    p.add_argument("--threads", type=int, default=1)
    # 0: images decoded in this process; worker start-up costs more than these tiny images.
    p.add_argument("--workers", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()  # before the imports: the wall time is the whole command's
    import torch

    from fixtures import make_fixtures as mf
    from vitdiag.results import jsonable

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (1 if args.quick else mf.TRAIN["epochs"])
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python experiments/closed_loop.py", *given])
    with tempfile.TemporaryDirectory(prefix="closed_loop_") as work:
        recipe = Recipe(
            epochs=epochs,
            limit=64 if args.quick else None,
            reference_images=32 if args.quick else 256,
            seed=args.seed,
            workers=args.workers,
            data=args.data.resolve(),
            work=Path(work),
        )
        loop = Loop(recipe)
        rows = loop.run()
    wall = time.perf_counter() - t0
    table = markdown(rows)
    head = f"`{command}`: {wall:.0f} s wall, {args.threads} torch thread(s).\n\n"
    doc = {
        "command": command,
        "wall_s": wall,
        "recipe": {**dataclasses.asdict(recipe), "work": None, "quick": args.quick},
        "rows": rows,
        "variants": loop.record,
    }
    if args.out is None:
        sys.stdout.write(head + table)
        return 0
    write_atomic(args.out / "closed_loop.md", head + table)
    write_atomic(args.out / "closed_loop.json", json.dumps(jsonable(doc), indent=1) + "\n")
    print(f"wrote {args.out / 'closed_loop.md'} and closed_loop.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
