"""What the report's shared pass costs on top of the forward pass it needs anyway.

A ViT-S-sized model with random weights (timm vit_small_patch16_224, 1000 classes, 224 px) runs
over the same synthetic batches (N(0,1) images in the normalised space, random labels so that
the labelled probes do their work) two ways, alternately:

- bare:   `model.forward_features(x)` under inference_mode, nothing else;
- report: `engine.run_probes` with every probe of `vitdiag report` that reads the shared forward
          — eval, calibration, collapse (NC1-NC4), similarity (every layer), variance at the
          native size (adds a patch_embed per batch) — built by `vitdiag.runner` as the report
          builds them; the classifier statistics (no data) are computed once, outside the loop.

Not included, because they are extra forwards by definition, not overhead: invariance
(views × augmentations forwards per image), mixup geometry (a fixed number of mixed pairs) and
variance at other sizes (one pass per size). Batches are made before timing, so data loading
is in neither. Every ratio is the median over alternating (bare, report) pairs; `--breakdown`
also times each probe alone. `--erank-every N` is similarity's option of that name (default 16:
the effective rank on images 0, 16, 32...; 1 measures every image, what it cost before).

    python benchmarks/bench_report_overhead.py [--images N] [--batch-size B] [--reps R]
        [--device cpu|cuda] [--threads T] [--breakdown] [--erank-every N]
        [--clock wall|process]

--clock process times the CPU seconds of this process instead of wall time: on a CPU shared
with other jobs it is far less noisy, and with --threads 1 it is what the wall time would be
on an idle core.

Default images: 512 on a GPU, 64 on the CPU.

--findings measures what the diagnosis costs instead (issue 20's budget: at most 1.10x): the
whole `run_all` of `vitdiag report` on the fixtures (vit_nomix, --data fixtures/data/train
--val fixtures/data/val, --sizes 48) with findings, intervals and references, against the same
run without them, alternately:
- without: `--reference-images 0` (no random-init pass), the Poisson-bootstrap sums replaced
           by zeros of their shape, no Gaussian-heads draws, no findings rules;
- with:    everything `vitdiag report` does, then the rules on the results document.
The jackknife's group sums (collapse) and the variance probe's paired bootstrap are in both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHARED = ("eval", "calibration", "collapse", "similarity", "variance")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--breakdown", action="store_true", help="also time each probe alone")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    parser.add_argument(
        "--erank-every",
        type=int,
        default=None,
        help="similarity: effective rank on images whose index is a multiple of N (default 16)",
    )
    parser.add_argument(
        "--findings", action="store_true", help="the cost of findings, intervals, references"
    )
    args = parser.parse_args()
    if args.findings:
        findings_overhead(args)
        return
    n = args.images or (512 if args.device.startswith("cuda") else 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "process" else time.perf_counter

    from vitdiag import load
    from vitdiag.data import eval_transform
    from vitdiag.engine import resolve_amp, run_probes
    from vitdiag.probes.classifier import classifier_result
    from vitdiag.runner import Settings, build_probe

    torch.manual_seed(0)
    loaded = load(None, arch="vit_small_patch16_224")
    model = loaded.model.to(device).eval()
    amp = resolve_amp(args.amp, device)
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, n, args.batch_size):
        b = min(args.batch_size, n - start)
        x = torch.randn(b, 3, 224, 224, generator=g).to(device)
        y = torch.randint(0, loaded.num_classes, (b,), generator=g)
        batches.append((x, y))
    transform = eval_transform(loaded.data_config, loaded.img_size)
    settings = Settings(device=args.device, amp=args.amp)
    if args.erank_every is not None:
        settings.erank_every = args.erank_every

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> float:
        sync()
        start = clock()
        with torch.inference_mode(), torch.autocast(device.type, amp, enabled=amp is not None):
            for x, _ in batches:
                model.forward_features(x)
        sync()
        return clock() - start

    def report(names=SHARED) -> float:
        probes = [build_probe(name, loaded, transform, settings) for name in names]
        sync()
        start = clock()
        run_probes(model, batches, probes, device=device, amp=args.amp, loaded=loaded)
        sync()
        return clock() - start

    classifier_seconds = time.perf_counter()
    classifier_result(model)
    classifier_seconds = time.perf_counter() - classifier_seconds

    def paired(names, reps: int) -> tuple[float, list[tuple[float, float]]]:
        """Median of report/bare over alternating pairs: a burst of load on a shared machine
        then hits both sides of a pair, not one configuration."""
        pairs = [(bare(), report(names)) for _ in range(reps)]
        return statistics.median(r / b for b, r in pairs), pairs

    bare()  # warm-up: first calls allocate and pick kernels
    report()
    ratio, pairs = paired(SHARED, args.reps)
    threads = torch.get_num_threads()
    print(
        f"vit_small_patch16_224 (random), 224 px, {n} synthetic images, batch {args.batch_size}, "
        f"{args.device}{'' if device.type == 'cuda' else f' ({threads} threads)'}, amp {args.amp}, "
        f"{args.clock} clock, similarity erank_every {settings.erank_every}"
    )
    print(f"{'rep':>4s} {'bare s':>8s} {'report s':>9s} {'ratio':>7s}")
    for i, (b, r) in enumerate(pairs):
        print(f"{i:4d} {b:8.2f} {r:9.2f} {r / b:7.3f}")
    spread = f"{min(r / b for b, r in pairs):.3f}-{max(r / b for b, r in pairs):.3f}"
    print(f"\nmedian ratio report / bare forward_features: {ratio:.3f} (spread {spread})")
    bare_s = statistics.median(b for b, _ in pairs)
    report_s = statistics.median(r for _, r in pairs)
    print(f"images/s: bare {n / bare_s:.1f}, report {n / report_s:.1f}")
    print(f"classifier statistics (once, no data): {classifier_seconds:.3f} s")
    if args.breakdown:
        print("\neach probe alone, median ratio over alternating pairs:")
        for name in SHARED:
            ratio, pairs = paired((name,), args.reps)
            alone = statistics.median(r for _, r in pairs)
            spread = f"{min(r / b for b, r in pairs):.3f}-{max(r / b for b, r in pairs):.3f}"
            print(f"  {name:12s} {ratio:6.3f}  (spread {spread}, {n / alone:.1f} images/s)")


def findings_overhead(args: argparse.Namespace) -> None:
    """The fixture report with and without its diagnosis, in alternating pairs."""
    import contextlib
    from pathlib import Path
    from unittest import mock

    import vitdiag.intervals as intervals
    import vitdiag.probes.classifier as classifier
    from vitdiag import load
    from vitdiag.findings import evaluate
    from vitdiag.model import describe
    from vitdiag.report import Entry, report_document
    from vitdiag.runner import Settings, run_all

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    root = Path(__file__).resolve().parents[1] / "fixtures"
    loaded = load(root / "models" / "vit_nomix")
    data, val = str(root / "data" / "train"), str(root / "data" / "val")

    def no_bootstrap(seed, indices, values, rows=None):
        k = 1 if values.ndim == 1 else values.shape[1]
        return torch.zeros(intervals.REPLICATES, 1 + k, dtype=torch.float64)

    def no_heads(c, d, metric, seed=0):
        return {"metric": metric, "value": float("nan"), "interval": None, "how": "off"}

    def one(with_findings: bool) -> float:
        refs = 256 if with_findings else 0
        settings = Settings(device=args.device, workers=0, quiet=True, reference_images=refs)
        patches = contextlib.ExitStack()
        if not with_findings:
            for module in ("accuracy", "calibration", "similarity"):
                target = f"vitdiag.probes.{module}.bootstrap_sums"
                patches.enter_context(mock.patch(target, no_bootstrap))
            patches.enter_context(
                mock.patch.object(classifier, "gaussian_heads_reference", no_heads)
            )
        with patches:
            start = clock()
            run = run_all(loaded, data, val_source=val, sizes=[48], settings=settings)
            if with_findings:
                doc = report_document([Entry("vit_nomix", describe(loaded), run)], {}, 0.0, 1)
                evaluate(doc)
            return clock() - start

    one(True)  # warm-up
    pairs = [(one(False), one(True)) for _ in range(args.reps)]
    print(
        f"vit_nomix, --data fixtures/data/train (600) --val fixtures/data/val (200) --sizes 48, "
        f"{args.device} ({torch.get_num_threads()} threads), {args.clock} clock"
    )
    print(f"{'rep':>4s} {'without s':>10s} {'with s':>8s} {'ratio':>7s}")
    for i, (a, b) in enumerate(pairs):
        print(f"{i:4d} {a:10.2f} {b:8.2f} {b / a:7.3f}")
    ratios = [b / a for a, b in pairs]
    print(
        f"\nmedian ratio report with / without findings: {statistics.median(ratios):.3f} "
        f"(spread {min(ratios):.3f}-{max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
