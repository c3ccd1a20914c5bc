"""vitdiag's one-pass NC1 against the reference method many repositories copy, same N, D, C.

REFERENCE (written here, for comparison only; not vitdiag code): the structure of the neural
collapse notebook of Papyan, Han & Donoho (2020) as it is commonly copied —
  pass 1 over the features: class means;
  pass 2 over the features again: Σ_W from the outer products of the centred features, built as
         a B×D×D tensor per batch (`z.unsqueeze(-1) @ z.unsqueeze(1)`) and summed;
  then NC1 = Tr(Σ_W Σ_B⁺)/C with Σ_B⁺ = pinv(Σ_B).
The notebook loops over classes inside each batch; this reference does the same outer products
for the whole batch at once, which is faster than the loop, so the comparison favours it.

VITDIAG: `CollapseProbe` — one pass, Σ_W from a D×D second moment about a running shift
(one GEMM per batch), per-class sums, NC4 from a bounded reservoir, all float64.

Both read the same seeded stream of float64 features (drawn batch by batch, never stored), in
separate fresh processes with one thread each; the time of drawing the features is measured
separately and left out. NC1 from both must agree.

    python benchmarks/bench_collapse_reference.py [--n 20000] [--dim 384] [--classes 100]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from _collapse_common import Stream, generation_seconds, in_child, measure, vitdiag_collapse


def reference_nc1(stream: Stream) -> dict:
    """REFERENCE METHOD (see the module docstring): two passes, B×D×D per batch."""
    c, d = stream.classes, stream.dim
    means = torch.zeros(c, d, dtype=torch.float64)
    counts = torch.zeros(c, dtype=torch.float64)
    for h, y, _ in stream:  # pass 1: class means
        means.index_add_(0, y, h)
        counts += torch.bincount(y, minlength=c)
    means /= counts[:, None]
    sigma_w = torch.zeros(d, d, dtype=torch.float64)
    for h, y, _ in stream:  # pass 2: within-class covariance from per-sample outer products
        z = h - means[y]
        cov = torch.matmul(z.unsqueeze(-1), z.unsqueeze(1))  # (B, D, D)
        sigma_w += cov.sum(dim=0)
    sigma_w /= counts.sum()
    mu_g = means.mean(dim=0)
    m = means - mu_g
    sigma_b = m.T @ m / c
    nc1 = float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True))) / c
    return {"nc1": nc1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)  # ViT-S pre-logits
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--budget", type=int, default=10_000)
    parser.add_argument("--child", nargs="*")
    args = parser.parse_args()

    if args.child is not None:
        torch.set_num_threads(1)
        stream = Stream(args.n, args.dim, args.classes, args.batch)
        gen = generation_seconds(stream)
        small = Stream(2 * args.batch, args.dim, args.classes, args.batch)
        if args.child[0] == "reference":
            reference_nc1(small)  # warm-up: kernels and libraries load once
            row = measure(lambda: reference_nc1(stream))
            row["seconds"] -= 2 * gen  # two passes over the stream
        else:
            vitdiag_collapse(small, 64)
            row = measure(lambda: vitdiag_collapse(stream, args.budget))
            row["seconds"] -= gen
        print(json.dumps({**row, "generation_seconds": gen}))
        return

    child = ["--n", str(args.n), "--dim", str(args.dim), "--classes", str(args.classes)]
    child += ["--batch", str(args.batch), "--budget", str(args.budget)]
    ours = in_child(sys.argv[0], ["vitdiag", *child])
    # The reference computes no NC4; a small reservoir shows vitdiag's cost without it.
    small_budget = [*child[:-1], "1000"]
    lean = in_child(sys.argv[0], ["vitdiag", *small_budget])
    ref = in_child(sys.argv[0], ["reference", *child])
    print(
        f"N={args.n} D={args.dim} C={args.classes} batch={args.batch}, float64, 1 thread; "
        f"vitdiag also keeps an NC4 reservoir of {args.budget}"
    )
    print(f"{'method':34s} {'seconds':>8s} {'peak RSS MB':>12s} {'NC1':>12s}")
    rows = (
        (f"vitdiag CollapseProbe, NC4 {args.budget}", ours),
        ("vitdiag CollapseProbe, NC4 1000", lean),
        ("reference (2 passes, BxDxD)", ref),
    )
    for name, r in rows:
        print(f"{name:34s} {r['seconds']:8.2f} {r['peak_rss_mb']:12.1f} {r['nc1']:12.6g}")
    print(f"\ntime ratio      reference / vitdiag: {ref['seconds'] / ours['seconds']:.1f}x")
    print(f"peak RSS ratio  reference / vitdiag: {ref['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x")
    lean_ratio = ref["peak_rss_mb"] / lean["peak_rss_mb"]
    print(f"peak RSS ratio  reference / vitdiag with NC4 budget 1000: {lean_ratio:.1f}x")
    outer = args.batch * args.dim * args.dim * 8 / 2**20
    print(f"(one B x D x D float64 outer-product tensor: {outer:.0f} MB)")
    rel = abs(ref["nc1"] - ours["nc1"]) / abs(ref["nc1"])
    print(f"NC1 relative difference: {rel:.1e}")
    assert rel < 1e-6, "the two methods disagree on NC1"


if __name__ == "__main__":
    main()
