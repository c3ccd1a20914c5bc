"""What float64 per-batch products cost the collapse probe, against float32 ones.

`CollapseProbe.update` on one batch of float32 features (class sums, the D×D centred product,
the NC4 reservoir), with its products in float64 (the CPU's choice) and in float32 (the
accelerators'), alternately, CPU time of this process, one thread.

    python benchmarks/bench_collapse_dtype.py [--reps 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vitdiag.probes.base import Taps
from vitdiag.probes.classifier import Head
from vitdiag.probes.collapse import CollapseProbe

SHAPES = ((384, 1000, 32), (768, 1000, 256))  # (D, C, batch): ViT-S and ViT-B on ImageNet-1k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    print(f"CollapseProbe.update per batch, {args.device}, {'wall' if cuda else 'CPU'} time")
    for d, c, b in SHAPES:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(c, d, generator=g, dtype=torch.float64)
        taps = Taps(
            images=torch.empty(b, 0),
            targets=torch.randint(0, c, (b,), generator=g).to(device),
            prelogits=torch.randn(b, d, generator=g).to(device),
            logits=torch.randn(b, c, generator=g).to(device),
        )
        times: dict[torch.dtype, list[float]] = {torch.float64: [], torch.float32: []}
        probes = {dt: CollapseProbe([Head("head", w, None)], compute_dtype=dt) for dt in times}
        for _ in range(args.reps):
            for dt, probe in probes.items():
                if cuda:
                    torch.cuda.synchronize()
                start = clock()
                probe.update(taps)
                if cuda:
                    torch.cuda.synchronize()
                times[dt].append(clock() - start)
        f64, f32 = (statistics.median(times[dt]) * 1e3 for dt in times)
        print(f"D={d} C={c} batch {b}: float64 {f64:.2f} ms, float32 {f32:.2f} ms")


if __name__ == "__main__":
    main()
