"""Facts about the machine that set defaults; a leaf module (the CLI's option table imports it
without loading torch)."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """The ``--workers`` default: half the usable CPUs, at most 8.

    Half, because the main process (and on a CPU the forward's own threads) needs the rest; at
    most 8, because 8 workers already decode and augment faster than one GPU consumes
    (benchmarks/bench_invariance_workers.py) and every worker holds prefetched batches in
    shared memory. The loader starts fewer when there are fewer batches, none for one batch.
    """
    return min(8, usable_cpus() // 2)


DEFAULT_WORKERS = default_workers()
