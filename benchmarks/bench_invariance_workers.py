"""How many loader workers keep the invariance probe's forward fed.

Three measurements at each `--workers` count (default 0, 1, 2):

- images/s: the loader alone, clean batches only (decode, resize, crop, normalise) — what
  every other probe reads;
- views/s:  the loader alone with the invariance probe's worker views (every pixel-space
  augmentation — randaugment, autoaugment, trivialaugment, colorjitter, rrc — × `--views`,
  made from each image's 8-bit crop);
- invariance wall time: `run_all(..., probes={"invariance"})` with every augmentation, the
  model forwarding the clean batch and all views (views/s here is end to end).

Then the model's own forward throughput F (images/s of a bare `forward_features` + pre-logits
on batches already in memory) and how many workers keep it fed: per image the forward runs
1 clean image and 11·V views, of which the workers make the 5·V pixel-space ones, so they must
make 5V/(1+11V)·F views/s: ceil(that ÷ one worker's views/s) workers.

The data: ImageNet-sized JPEGs (500×375, smooth colour fields plus noise, quality 90) made in a
temporary folder, or `--data FOLDER`. The model: `--arch` with random weights at 224 px.

    python benchmarks/bench_invariance_workers.py [--images N] [--workers 0,1,2]
        [--batch-size B] [--views V] [--arch NAME] [--device cpu|cuda] [--data FOLDER]
        [--threads T] [--no-invariance]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PIXEL = ("randaugment", "autoaugment", "trivialaugment", "colorjitter", "rrc")


def make_folder(root: Path, n: int) -> Path:
    """`n` JPEGs of 500×375 in two class folders: decode cost like ImageNet's."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (375, 500, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB").save(
            folder / f"{i:05d}.jpg", quality=90
        )
    return root


def drain(loader) -> tuple[float, int]:
    start = time.perf_counter()
    n = sum(int(batch.images.shape[0]) for batch in loader)
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-invariance", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vitdiag.augmentations import AUGMENTATIONS, WorkerViews
    from vitdiag.data import make_loader, open_dataset
    from vitdiag.engine import resolve_device
    from vitdiag.model import load
    from vitdiag.runner import Settings, run_all, transform_at

    device = resolve_device(args.device)
    counts = [int(w) for w in args.workers.split(",")]
    loaded = load(None, arch=args.arch)
    transform = transform_at(loaded.data_config, Settings(), loaded.img_size)
    cfg = transform.config
    maker = WorkerViews(
        PIXEL,
        views=args.views,
        seed=0,
        size=transform.size,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
    )
    tmp = tempfile.TemporaryDirectory()
    folder = args.data or make_folder(Path(tmp.name) / "data", args.images)
    source = open_dataset(str(folder))
    n_views = len(PIXEL) * args.views
    print(
        f"data {folder} ({len(source)} images), {args.arch} at {transform.size}, "
        f"batch {args.batch_size}, {args.views} views, device {device}, "
        f"{torch.get_num_threads()} torch threads"
    )

    rows = []
    for w in counts:
        common = dict(batch_size=args.batch_size, workers=w, limit=args.images)
        clean = make_loader(source, transform, **common)
        drain(clean)  # start the (persistent) workers and warm the page cache
        t_img, n = drain(clean)
        views = make_loader(source, transform, views=maker, **common)
        drain(views)
        t_views, _ = drain(views)
        row = {"workers": w, "images/s": n / t_img, "views/s": n * n_views / t_views}
        if not args.no_invariance:
            start = time.perf_counter()
            found = run_all(
                loaded,
                source,
                probes={"invariance"},
                aug="all",
                views=args.views,
                workers=w,
                batch_size=args.batch_size,
                limit=args.images,
                device=str(device),
                label_check=False,
            )
            wall = time.perf_counter() - start
            n_all = found.data["data"]["n_images"]
            row["invariance s"] = wall
            row["inv views/s"] = n_all * args.views * len(AUGMENTATIONS) / wall
        rows.append(row)
        del clean, views

    # The forward's appetite: views it can consume per second, data already in memory.
    model = loaded.model.to(device).eval()
    x = torch.randn(args.batch_size, 3, *transform.size, device=device)
    with torch.inference_mode():
        for _ in range(2):
            model.forward_head(model.forward_features(x), pre_logits=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        reps, start = 3, time.perf_counter()
        for _ in range(reps):
            model.forward_head(model.forward_features(x), pre_logits=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    forward = reps * args.batch_size / (time.perf_counter() - start)

    keys = list(rows[0])
    print(" | ".join(f"{k:>13}" for k in keys))
    for row in rows:
        print(
            " | ".join(
                f"{row[k]:13.1f}" if isinstance(row[k], float) else f"{row[k]:13d}" for k in keys
            )
        )
    per_worker = next((r["views/s"] for r in rows if r["workers"] == 1), rows[-1]["views/s"])
    # Per image the forward runs 1 clean + len(AUGMENTATIONS)·V views; the workers make the
    # len(PIXEL)·V pixel-space ones (erasing, cutout and mixing are made on the device).
    share = n_views / (1 + len(AUGMENTATIONS) * args.views)
    print(f"forward: {forward:.1f} images/s ({args.arch}, batch {args.batch_size}, {device})")
    print(
        f"one worker makes {per_worker:.1f} views/s; a forward of F images/s needs "
        f"{share:.2f}·F worker views/s, so ceil({share:.2f}·F / {per_worker:.0f}) workers: "
        f"{math.ceil(share * forward / per_worker)} for this forward"
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
