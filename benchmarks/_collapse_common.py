"""Shared by the collapse benchmarks: a seeded stream of classifier inputs, and measuring a
function's peak memory in a fresh process.

Features are drawn batch by batch (never held all at once), so the stream itself costs one
batch of memory; h = μ_y + noise, logits = h Wᵀ + b for a random classifier, in float64 or in
float32 (what the engine hands the probes).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class Stream:
    def __init__(
        self,
        n: int,
        dim: int,
        classes: int,
        batch: int,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: str = "cpu",
    ) -> None:
        """Batches of `dtype` features made on `device` (a GPU stream never crosses to the
        CPU, as the engine's features do not)."""
        self.n, self.dim, self.classes, self.batch, self.seed = n, dim, classes, batch, seed
        self.dtype, self.device = dtype, torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self.means = 3.0 * torch.randn(classes, dim, generator=g, dtype=torch.float64)
        self.weight = torch.randn(classes, dim, generator=g, dtype=torch.float64) / dim**0.5
        self.bias = 0.1 * torch.randn(classes, generator=g, dtype=torch.float64)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(self.seed + 1)
        means = self.means.to(dev)
        weight, bias = self.weight.to(dev, self.dtype), self.bias.to(dev, self.dtype)
        for start in range(0, self.n, self.batch):
            b = min(self.batch, self.n - start)
            y = torch.randint(0, self.classes, (b,), generator=g, device=dev)
            noise = torch.randn(b, self.dim, generator=g, dtype=torch.float64, device=dev)
            h = (means[y] + noise).to(self.dtype)
            yield h, y, h @ weight.T + bias


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_seconds(stream: Stream, clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    for _ in stream:
        pass
    sync(stream.device)
    return clock() - start


def measure(fn: Callable[[], dict], device: str = "cpu") -> dict:
    """Run fn once, in this process: seconds, peak RSS above the start, tracemalloc peak, and
    on CUDA the peak of allocated GPU memory above the start."""
    dev = torch.device(device)
    cuda_base = 0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        cuda_base = torch.cuda.memory_allocated(dev)
    base = rss_bytes()
    tracemalloc.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    sync(dev)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    cuda_peak = torch.cuda.max_memory_allocated(dev) - cuda_base if dev.type == "cuda" else 0
    return {
        **out,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_mb": (peak_rss_bytes() - base) / 2**20,
        "tracemalloc_peak_mb": traced / 2**20,
        "peak_cuda_mb": cuda_peak / 2**20,
    }


def in_child(script: str, args: list[str], glibc_default: bool = False) -> dict:
    """Run `script --child ARGS` in a fresh interpreter (a clean peak-RSS counter) and read
    the JSON line it prints last.

    Unless `glibc_default`, blocks of 64 KiB and more are mmap-ed, so freeing them returns
    them to the system: RSS then follows the memory in use instead of what glibc's heap keeps
    after fragmentation (which grows slowly with the number of allocations, whatever is live).
    """
    env = dict(os.environ)
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(
        [sys.executable, script, "--child", *args],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def vitdiag_collapse(stream: Stream, budget: int, compute_dtype: torch.dtype | None = None) -> dict:
    """vitdiag's streaming CollapseProbe over the stream: one pass, float64 sums (per-batch
    products in `compute_dtype`: None is the probe's choice for the device)."""
    from vitdiag.probes.base import Taps
    from vitdiag.probes.classifier import Head
    from vitdiag.probes.collapse import CollapseProbe

    head = Head("head", stream.weight, stream.bias)
    probe = CollapseProbe([head], budget=budget, seed=0, compute_dtype=compute_dtype)
    live = 0
    for h, y, logits in stream:
        probe.update(Taps(images=torch.empty(len(y), 0), targets=y, prelogits=h, logits=logits))
        live = max(live, state_bytes(probe))
    m = probe.compute().metrics
    return {
        "nc1": m["nc1"],
        "nc4": m["nc4"],
        "nc4_sample": m["nc4_sample_size"],
        "state_mb": live / 2**20,
    }


def state_bytes(probe) -> int:
    """Bytes of every tensor the probe keeps between batches (its sum and list states)."""
    total = sum(t.nbytes for t in probe.sum_states().values())
    return total + sum(t.nbytes for ts in probe.cat_states().values() for t in ts)
