"""Would `torch.compile` speed up the engine's forward? Eager vs compiled, hooks attached.

The engine reads every tapped layer through forward hooks (`engine.LayerRecorder`) from one
`forward_features` call. This compiles that call with the recorder's hooks registered (dynamo
traces them into the graph), checks that every hook still fires and that features and tapped
tokens agree with eager, and times eager vs compiled over alternating calls after the first,
compiling, call.

    python benchmarks/bench_compile.py [--arch vit_small_patch16_224] [--batch-size 16]
        [--device cpu|cuda] [--amp off|bf16|fp16] [--reps 5] [--mode default|reduce-overhead|...]

The finding on the development CPU is in benchmarks/README.md; vitdiag has no --compile
option because of it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mode", default="default")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vitdiag import load
    from vitdiag.engine import LayerRecorder, resolve_amp
    from vitdiag.families import family_of

    device = torch.device(args.device)
    amp = resolve_amp(args.amp, device)
    loaded = load(None, arch=args.arch)
    model = loaded.model.to(device).eval()
    size = tuple(loaded.img_size)
    x = torch.randn(args.batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    recorder = LayerRecorder(model, family_of(model).layer_taps(model))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def call(fn) -> tuple[float, torch.Tensor, dict]:
        sync()
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, amp, enabled=amp is not None):
            out = fn(x)
        layers, _ = recorder.collect()
        sync()
        return time.perf_counter() - start, out, layers

    eager = model.forward_features
    call(eager)  # warm-up
    _, ref, ref_layers = call(eager)
    compiled = torch.compile(eager, mode=None if args.mode == "default" else args.mode)
    compile_s, out, layers = call(compiled)
    pairs = [(call(eager)[0], call(compiled)[0]) for _ in range(args.reps)]
    recorder.close()

    feats_diff = float((out.float() - ref.float()).abs().max())
    layer_diff = max(
        (float((layers[k] - ref_layers[k]).abs().max()) for k in ref_layers if k in layers),
        default=float("nan"),
    )
    threads = "" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"
    print(
        f"{args.arch}, {size[0]} px, batch {args.batch_size}, {args.device}{threads}, "
        f"amp {args.amp}, torch.compile mode {args.mode}"
    )
    print(f"first compiled call (compiling): {compile_s:.1f} s")
    print(
        f"hooks fired: {len(layers)} of {len(ref_layers)} tapped layers; max |diff| vs eager: "
        f"features {feats_diff:.2e}, tapped tokens {layer_diff:.2e}"
    )
    print(f"{'rep':>4s} {'eager s':>8s} {'compiled s':>11s} {'ratio':>7s}")
    for i, (e, c) in enumerate(pairs):
        print(f"{i:4d} {e:8.3f} {c:11.3f} {c / e:7.3f}")
    ratio = statistics.median(c / e for e, c in pairs)
    eager_s = statistics.median(e for e, _ in pairs)
    saved = eager_s - statistics.median(c for _, c in pairs)
    print(f"\nmedian compiled / eager: {ratio:.3f}")
    if saved > 0:
        batches = compile_s / saved
        print(
            f"compiling pays for itself after {batches:.0f} batches "
            f"({batches * args.batch_size:.0f} images) at this size"
        )
    else:
        print("compiling never pays for itself here: the compiled forward is not faster")


if __name__ == "__main__":
    main()
