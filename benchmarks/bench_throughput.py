"""Images per second of whole probe passes through `vitdiag.run_all`, data loading included.

Each probe runs alone over synthetic images (``synthetic:N``: N(0, 1) in the normalised space,
so no decoding; the transform is skipped) at the model's native size, once per --workers value,
after a short warm-up run. For invariance the augmented views are counted too (views/s =
images × views × augmentations / s).

    python benchmarks/bench_throughput.py [--arch vit_small_patch16_224] [--images 256]
        [--batch-size 64] [--device cpu|cuda] [--amp off|bf16|fp16] [--workers 0,2]
        [--probes eval,invariance] [--views 4]

Default images: 2048 on a GPU, 32 on the CPU.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off")
    parser.add_argument("--workers", default="0")
    parser.add_argument("--probes", default="eval,invariance")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images or (2048 if args.device.startswith("cuda") else 32)

    from vitdiag import load
    from vitdiag.runner import run_all

    loaded = load(None, arch=args.arch)

    def one(probe: str, workers: int, images: int) -> tuple[float, int]:
        start = time.perf_counter()
        results = run_all(
            loaded,
            f"synthetic:{images}",
            probes=probe,
            device=args.device,
            amp=args.amp,
            batch_size=args.batch_size,
            workers=workers,
            views=args.views,
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        augs = sum(1 for r in results for k in r.metrics if k.endswith(".linv"))
        return seconds, augs

    print(
        f"{args.arch} (random), {tuple(loaded.img_size)[0]} px, {n} synthetic images, "
        f"batch {args.batch_size}, {args.device}, amp {args.amp}, views {args.views}"
    )
    print(f"{'probe':12s} {'workers':>7s} {'seconds':>8s} {'images/s':>9s} {'views/s':>8s}")
    for probe in args.probes.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            one(probe, workers, min(n, args.batch_size))  # warm-up: kernels, worker start
            seconds, augs = one(probe, workers, n)
            views = f"{n * args.views * augs / seconds:8.1f}" if augs else f"{'':8s}"
            print(f"{probe:12s} {workers:7d} {seconds:8.2f} {n / seconds:9.1f} {views}")


if __name__ == "__main__":
    main()
