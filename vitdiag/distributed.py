"""Processes: which one this is, which images it reads, and how their sums become one.

Sharding is the engine's alone (DESIGN.md): probes see global image positions and batches and
return sums; this module knows the rank, the world size and the stride rule that joins them.

The stride rule: of the single-process order of images, process r of w reads images
r, r + w, r + 2w, … (`data.select_indices` takes ``order[rank::world_size]``), so local image k
of process r is image r + k·w of the single-process stream. Strided shards are disjoint, need no
padding and cover every image, so sums over processes equal the single-process sums.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vitdiag.errors import VitdiagError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vitdiag.probes.base import Probe


@dataclass(frozen=True)
class Shard:
    """The images one process reads: every `world`-th of the single-process order, from `rank`."""

    rank: int = 0
    world: int = 1

    def take(self, order: list[int]) -> list[int]:
        """This process's part of the single-process order (the stride rule)."""
        return order[self.rank :: self.world]

    def positions(self, start: int, n: int) -> torch.Tensor:
        """(n,) int64 single-process stream positions of this process's local images
        start … start + n − 1: the stride rule run backwards."""
        return self.rank + (start + torch.arange(n, dtype=torch.int64)) * self.world


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Launch:
    """Where this process sits, as its launcher said: torchrun and `accelerate launch` (which
    starts its processes through torchrun's launcher) set RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_ADDR/MASTER_PORT; `srun` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    addr: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    launcher: str = "none"


def launch_env(env: Mapping[str, str]) -> Launch:
    """The launch an environment describes; WORLD_SIZE (torchrun, accelerate) wins over SLURM's
    variables, since torchrun inside an sbatch job sees both."""
    try:
        if "WORLD_SIZE" in env:
            world, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
            local, launcher = int(env.get("LOCAL_RANK", "0")), "torchrun"
        elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
            world, rank = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
            local, launcher = int(env.get("SLURM_LOCALID", "0")), "slurm"
        else:
            return Launch()
        port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    except ValueError as e:
        raise VitdiagError(
            f"the launcher's rank/world variables are not whole numbers ({e}); check the "
            "environment torchrun or srun set."
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise VitdiagError(
            f"rank {rank} does not fit a world of {world} processes; check the environment "
            "torchrun or srun set."
        )
    addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR")
    addr = addr or _first_host(env.get("SLURM_NODELIST", "")) or "127.0.0.1"
    return Launch(rank, world, local, addr, port, launcher)


def _first_host(nodelist: str) -> str | None:
    """The first host of a SLURM node list: ``gpu[03-05,07],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist.strip())
    if not match:
        return None
    return match.group(1) + (match.group(2) or "")


def init_distributed() -> tuple[int, int]:
    """Join the process group of torchrun, `accelerate launch` or `srun` (gloo on CPU, nccl on
    GPU); (rank, world size)."""
    launch = launch_env(os.environ)
    if launch.world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if launch.launcher == "slurm":  # no torchrun store: rank 0 hosts one at addr:port
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{launch.addr}:{launch.port}",
                rank=launch.rank,
                world_size=launch.world,
            )
        else:
            dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(launch.local_rank)
    return dist.get_rank(), dist.get_world_size()


def current_shard() -> Shard:
    """This process's shard: its rank and the world size, (0, 1) without a process group."""
    if not is_distributed():
        return Shard()
    import torch.distributed as dist

    return Shard(dist.get_rank(), dist.get_world_size())


def join_shard() -> Shard:
    """Join torchrun's process group if there is one (`init_distributed`) and return the shard
    a loader should read (its `rank` and `world` are `make_loader`'s rank and world_size)."""
    init_distributed()
    return current_shard()


def is_main_process() -> bool:
    return current_shard().rank == 0


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    # nccl reduces CUDA tensors only; gloo is happy with CPU ones.
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(on).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def reduce_probe(probe: Probe, device: torch.device) -> None:
    """Add the probe's sum states over processes; gather its cat states in rank order."""
    import torch.distributed as dist

    for name, value in probe.sum_states().items():
        probe.set_state(name, all_reduce_sum(value, device))
    cats = probe.cat_states()
    if cats:
        local = {k: [v.cpu() for v in vs] for k, vs in cats.items()}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        merged = {k: [t for part in gathered for t in part[k]] for k in cats}
        probe.merge_cat_states(merged)


def reduce_pass(
    probes: Sequence[Probe], n_images: int, n_bad: int, device: torch.device
) -> tuple[int, int, int]:
    """(images read, images unreadable, world size) over every process, after adding up the
    probes' states across processes; one process returns its own counts unchanged."""
    if not is_distributed():
        return n_images, n_bad, 1
    world = current_shard().world
    totals = torch.tensor([n_images, n_bad, float(n_images == 0)], dtype=torch.float64)
    totals = all_reduce_sum(totals, device)
    # A process that saw no image may lack lazily created states (similarity makes its
    # sums at the first batch), and the reductions below would then wait forever.
    if totals[2] > 0 and totals[0] > 0:
        raise VitdiagError(
            f"{int(totals[2])} of {world} processes got no image to read "
            f"({int(totals[0])} images in all); start no more processes than there are images."
        )
    if totals[0] > 0:
        for probe in probes:
            reduce_probe(probe, device)
    return int(totals[0]), int(totals[1]), world
