"""How far every headline metric moves under mixed precision, and under float32 products.

Runs `vitdiag.run_all` (every probe that applies) on the bundled fixture models and images
several ways and prints, per headline metric (the keys each probe declares in `headlines`), the
largest relative difference over the models against a reference run:

- amp:      --amp bf16 (and fp16 on CUDA) against --amp off, each with the device's own
            product dtypes (float64 on the CPU, float32 on accelerators);
- products: the per-batch products of similarity (Grams) and collapse (class sums, second
            moments) in float32 against the same run with them in float64, amp off. On the CPU
            this forces the accelerator path; on CUDA it forces the float64 reference.

    python benchmarks/bench_amp_agreement.py [--device cpu|cuda] [--limit N] [--models a,b]
        [--sections amp,products]

Default --limit: 48 images per dataset on the CPU (a run of a few minutes), all on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
MODELS = ("vit_nomix", "vit_mixup", "vit_cutmix")


@contextlib.contextmanager
def products(dtype: torch.dtype | None) -> Iterator[None]:
    """Every per-batch product dtype set to `dtype` on every device (None: leave as is)."""
    import vitdiag.probes.collapse as collapse
    import vitdiag.probes.similarity as similarity

    names = [
        (similarity, "_CPU_GRAM_DTYPE"),
        (similarity, "_ACCELERATOR_GRAM_DTYPE"),
        (collapse, "_CPU_COMPUTE_DTYPE"),
        (collapse, "_ACCELERATOR_COMPUTE_DTYPE"),
    ]
    saved = [getattr(module, name) for module, name in names]
    try:
        if dtype is not None:
            for module, name in names:
                setattr(module, name, dtype)
        yield
    finally:
        for (module, name), value in zip(names, saved, strict=True):
            setattr(module, name, value)


def headline_metrics(results) -> dict[str, float]:
    """probe.key -> value for every metric a probe declares among its headlines."""
    from vitdiag.probes.registry import probe_classes

    classes = probe_classes()
    out = {}
    for r in results:
        cls = classes.get(r.probe)
        if cls is None:
            continue
        for key, value in r.metrics.items():
            if any(re.fullmatch(p, key) for p in cls.headlines):
                out[f"{r.probe}.{key}"] = value
    return out


def run(model: str, args: argparse.Namespace, amp: str, dtype: torch.dtype | None) -> dict:
    from vitdiag import load
    from vitdiag.runner import run_all

    loaded = load(str(FIXTURES / "models" / model))
    with products(dtype):
        results = run_all(
            loaded,
            str(FIXTURES / "data" / "train"),
            val_source=str(FIXTURES / "data" / "val"),
            sizes=[48],
            device=args.device,
            amp=amp,
            limit=args.limit,
            batch_size=args.batch_size,
            views=args.views,
        )
    return headline_metrics(results)


def rel_diff(got: float, want: float) -> float:
    if math.isnan(got) and math.isnan(want):
        return 0.0
    if math.isnan(got) or math.isnan(want):
        return math.inf
    if got == want:
        return 0.0
    return abs(got - want) / max(abs(want), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--views", type=int, default=2, help="invariance views per image")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sections", default="amp,products")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if args.limit is None and not cuda:
        args.limit = 48
    sections = set(args.sections.split(","))

    # column name -> (amp, forced product dtype) of the run, against its reference run
    columns: dict[str, tuple[tuple[str, torch.dtype | None], tuple[str, torch.dtype | None]]] = {}
    if "amp" in sections:
        for amp in ("bf16", "fp16") if cuda else ("bf16",):
            columns[f"{amp} vs fp32"] = ((amp, None), ("off", None))
    if "products" in sections:
        columns["f32 vs f64 products"] = (("off", torch.float32), ("off", torch.float64))

    start = time.perf_counter()
    worst: dict[str, dict[str, tuple[float, float]]] = {c: {} for c in columns}
    for model in args.models.split(","):
        cache: dict[tuple[str, torch.dtype | None], dict] = {}
        for column, (case, ref) in columns.items():
            for key in (case, ref):
                if key not in cache:
                    cache[key] = run(model, args, *key)
            got, want = cache[case], cache[ref]
            for name in sorted(set(got) | set(want)):
                g, w = got.get(name, math.nan), want.get(name, math.nan)
                r, a = rel_diff(g, w), abs(g - w) if math.isfinite(g - w) else 0.0
                old = worst[column].get(name, (0.0, 0.0))
                worst[column][name] = (max(old[0], r), max(old[1], a))
    seconds = time.perf_counter() - start

    limit = "all images" if args.limit is None else f"limit {args.limit}"
    print(
        f"fixture models {args.models} on {args.device} ({limit} per dataset, sizes 48, "
        f"{args.views} invariance views), {seconds:.0f} s"
    )
    print("max relative difference over the models (max absolute in brackets)\n")
    names = sorted({n for col in worst.values() for n in col})
    width = max(len(n) for n in names) if names else 10
    print(f"{'metric':{width}s} " + " ".join(f"{c:>24s}" for c in columns))
    for name in names:
        cells = []
        for column in columns:
            r, a = worst[column].get(name, (math.nan, math.nan))
            cells.append(f"{r:10.2e} ({a:9.2e})".rjust(24))
        print(f"{name:{width}s} " + " ".join(cells))
    for column in columns:
        values = [r for r, _ in worst[column].values() if math.isfinite(r)]
        if values:
            print(f"\n{column}: largest relative difference of any headline {max(values):.2e}")


if __name__ == "__main__":
    main()
