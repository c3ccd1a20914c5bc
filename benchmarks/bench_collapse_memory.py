"""Peak memory of vitdiag's neural-collapse statistics as the number of feature vectors grows.

CollapseProbe keeps float64 sums (per-class sums, a D×D second moment) and a reservoir of at
most `--budget` vectors for NC4, so its memory should not grow with N once N passes the budget,
and its time should grow linearly in N (µs per vector constant). Features are streamed batch by
batch, in float32 as the engine hands them (never held: 1M × 768 would be 3 GB). Each N runs in
a fresh process; after a small warm-up run (which loads the BLAS/LAPACK kernels), peak RSS is
measured above the process's RSS at the start of the pass. Also printed: the largest size of the
probe's own state between batches (every tensor it keeps), and tracemalloc's peak (Python
objects only: torch's CPU tensors are invisible to it).

    python benchmarks/bench_collapse_memory.py [--sizes 10000,100000,1000000] [--dim 768]
        [--classes 1000] [--compute-dtype auto|float32|float64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _collapse_common import Stream, generation_seconds, in_child, measure, vitdiag_collapse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=768)  # ViT-B pre-logits
    parser.add_argument("--classes", type=int, default=1000)  # ImageNet-1k
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--budget", type=int, default=10_000)  # vitdiag's default NC4 budget
    parser.add_argument(
        "--compute-dtype",
        choices=("auto", "float32", "float64"),
        default="auto",
        help="dtype of the per-batch products (auto: the probe's choice, float64 on the CPU)",
    )
    parser.add_argument("--device", default="cpu", help="where features are made and reduced")
    parser.add_argument("--child", nargs="*")
    parser.add_argument(
        "--glibc-default", action="store_true", help="Leave glibc's mmap threshold as it is."
    )
    args = parser.parse_args()

    if args.child is not None:
        import torch

        torch.set_num_threads(1)
        n = int(args.child[0])
        compute = None if args.compute_dtype == "auto" else getattr(torch, args.compute_dtype)
        f32 = dict(dtype=torch.float32, device=args.device)
        stream = Stream(n, args.dim, args.classes, args.batch, **f32)
        gen = generation_seconds(stream)
        gen_cpu = generation_seconds(stream, time.process_time)
        # Warm-up on a few vectors: loading BLAS/LAPACK kernels and vitdiag's modules costs
        # resident memory once, whatever N is; the measurement starts after it.
        vitdiag_collapse(Stream(2 * args.batch, args.dim, args.classes, args.batch, **f32), 64)
        row = measure(lambda: vitdiag_collapse(stream, args.budget, compute), args.device)
        print(json.dumps({**row, "generation_seconds": gen, "generation_cpu_seconds": gen_cpu}))
        return

    sizes = [int(v) for v in args.sizes.split(",")]
    rows = []
    child = ["--dim", str(args.dim), "--classes", str(args.classes), "--batch", str(args.batch)]
    child += ["--budget", str(args.budget), "--compute-dtype", args.compute_dtype]
    child += ["--device", args.device]
    for n in sizes:
        rows.append((n, in_child(sys.argv[0], [str(n), *child], args.glibc_default)))
    base = rows[0][1]["peak_rss_mb"]
    print(
        f"D={args.dim} C={args.classes} batch={args.batch} NC4 budget={args.budget}, "
        f"float32 features on {args.device}, products {args.compute_dtype}, 1 CPU thread"
    )
    print(
        f"{'N':>8s} {'peak RSS MB':>12s} {'x first':>8s} {'state MB':>9s}"
        f" {'tracemalloc MB':>15s} {'s (excl. gen)':>14s} {'us/vector':>10s} {'NC4 sample':>11s}"
        f" {'peak CUDA MB':>13s} {'CPU s':>10s}"
    )
    for n, r in rows:
        seconds = r["seconds"] - r["generation_seconds"]
        print(
            f"{n:8d} {r['peak_rss_mb']:12.1f} {r['peak_rss_mb'] / base:8.2f} {r['state_mb']:9.1f}"
            f" {r['tracemalloc_peak_mb']:15.2f} {seconds:14.2f} {seconds / n * 1e6:10.1f}"
            f" {int(r['nc4_sample']):11d} {r.get('peak_cuda_mb', 0.0):13.1f}"
            f" {r['cpu_seconds'] - r['generation_cpu_seconds']:10.2f}"
        )
    last = rows[-1][1]
    print(f"\npeak RSS  N={sizes[-1]} / N={sizes[0]}: {last['peak_rss_mb'] / base:.2f}")
    growth = last["state_mb"] / rows[0][1]["state_mb"]
    print(f"state     N={sizes[-1]} / N={sizes[0]}: {growth:.2f}")
    # compute() costs the same whatever N (eigh of Σ_B, NC4 on the ≤ budget sample), so time is
    # a + b·N: linear means the marginal cost b is the same between every pair of sizes.
    # CPU seconds of the process are what a quiet machine would show as wall time (one thread);
    # on a shared CPU the wall clock also counts other jobs.
    for clock, key in (("wall", "seconds"), ("CPU", "cpu_seconds")):
        gen_key = "generation_" + key
        secs = [r[key] - r[gen_key] for _, r in rows]
        for (n0, _), (n1, _), s0, s1 in zip(rows, rows[1:], secs, secs[1:], strict=False):
            per = (s1 - s0) / (n1 - n0) * 1e6
            print(f"marginal {clock} time N={n0}..{n1}: {per:.1f} us/vector")
    bound = (2 * args.budget * (args.dim + 2) + args.dim * (args.dim + args.classes + 2)) * 8
    print(
        f"state bound: NC4 reservoir of at most 2 x budget rows + D x D + C x D sums = "
        f"{bound / 2**20:.1f} MB, whatever N"
    )


if __name__ == "__main__":
    main()
