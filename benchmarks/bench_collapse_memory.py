"""Peak memory of vitdiag's neural-collapse statistics as the number of feature vectors grows.

CollapseProbe keeps float64 sums (per-class sums, a D×D second moment) and a reservoir of at
most `--budget` vectors for NC4, so its memory should not grow with N once N passes the budget.
Each N runs in a fresh process; after a small warm-up run (which loads the BLAS/LAPACK kernels),
peak RSS is measured above the process's RSS at the start of the pass. Also printed: the
largest size of the probe's own state between batches (every tensor it keeps), and tracemalloc's
peak (Python objects only: torch's CPU tensors are invisible to it).

    python benchmarks/bench_collapse_memory.py [--sizes 10000,25000,50000,100000] [--dim 384]
"""

from __future__ import annotations

import argparse
import json
import sys

from _collapse_common import Stream, generation_seconds, in_child, measure, vitdiag_collapse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,25000,50000,100000")
    parser.add_argument("--dim", type=int, default=384)  # ViT-S pre-logits
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--budget", type=int, default=10_000)  # vitdiag's default NC4 budget
    parser.add_argument("--child", nargs="*")
    parser.add_argument(
        "--glibc-default", action="store_true", help="Leave glibc's mmap threshold as it is."
    )
    args = parser.parse_args()

    if args.child is not None:
        import torch

        torch.set_num_threads(1)
        n = int(args.child[0])
        stream = Stream(n, args.dim, args.classes, args.batch)
        gen = generation_seconds(stream)
        # Warm-up on a few vectors: loading BLAS/LAPACK kernels and vitdiag's modules costs
        # resident memory once, whatever N is; the measurement starts after it.
        vitdiag_collapse(Stream(2 * args.batch, args.dim, args.classes, args.batch), 64)
        row = measure(lambda: vitdiag_collapse(stream, args.budget))
        print(json.dumps({**row, "generation_seconds": gen}))
        return

    sizes = [int(v) for v in args.sizes.split(",")]
    rows = []
    child = ["--dim", str(args.dim), "--classes", str(args.classes), "--batch", str(args.batch)]
    child += ["--budget", str(args.budget)]
    for n in sizes:
        rows.append((n, in_child(sys.argv[0], [str(n), *child], args.glibc_default)))
    base = rows[0][1]["peak_rss_mb"]
    print(f"D={args.dim} C={args.classes} batch={args.batch} NC4 budget={args.budget}, 1 thread")
    print(
        f"{'N':>8s} {'peak RSS MB':>12s} {'x first':>8s} {'state MB':>9s}"
        f" {'tracemalloc MB':>15s} {'s (excl. gen)':>14s} {'NC4 sample':>11s}"
    )
    for n, r in rows:
        print(
            f"{n:8d} {r['peak_rss_mb']:12.1f} {r['peak_rss_mb'] / base:8.2f} {r['state_mb']:9.1f}"
            f" {r['tracemalloc_peak_mb']:15.2f} {r['seconds'] - r['generation_seconds']:14.2f}"
            f" {int(r['nc4_sample']):11d}"
        )
    last = rows[-1][1]
    print(f"\npeak RSS  N={sizes[-1]} / N={sizes[0]}: {last['peak_rss_mb'] / base:.2f}")
    growth = last["state_mb"] / rows[0][1]["state_mb"]
    print(f"state     N={sizes[-1]} / N={sizes[0]}: {growth:.2f}")
    bound = (2 * args.budget * (args.dim + 2) + args.dim * (args.dim + args.classes + 2)) * 8
    print(
        f"state bound: NC4 reservoir of at most 2 x budget rows + D x D + C x D sums = "
        f"{bound / 2**20:.1f} MB, whatever N"
    )


if __name__ == "__main__":
    main()
