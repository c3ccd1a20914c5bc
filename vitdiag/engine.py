"""The single pass: one forward per batch, taps handed to every probe, sums reduced over processes.

Taps come from forward hooks placed where the family table says (`families.py`), not from
timm's `forward_intermediates`: hooks give block outputs, the final features, pre-logits and
logits from one ordinary forward, for every family alike, whereas `forward_intermediates` would
need a second call (or per-family handling of its return value) to reach the logits.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitdiag.distributed import current_shard, reduce_pass
from vitdiag.errors import VitdiagError
from vitdiag.families import NCHW, NHWC, NLC, PIT, LayerTap, family_of, module_at
from vitdiag.probes.base import FEATURES, LAYERS, LOGITS, PATCH, PRELOGITS, Probe, Taps
from vitdiag.results import Result

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise VitdiagError(
            f"--device {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VitdiagError(
                "--device cuda was asked for but no CUDA GPU is visible; use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise VitdiagError(
                f"--device {spec} does not exist: "
                f"{torch.cuda.device_count()} CUDA device(s) visible."
            )
    if device.type == "mps" and not (torch.backends.mps.is_available()):
        raise VitdiagError("--device mps was asked for but MPS is not available; use --device cpu.")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp not in AMP_DTYPES:
        raise VitdiagError(f"--amp {amp!r} is not known; use off, bf16 or fp16.")
    dtype = AMP_DTYPES[amp]
    if dtype is torch.float16 and device.type == "cpu":
        raise VitdiagError("--amp fp16 needs a GPU; on the CPU use --amp bf16 or --amp off.")
    return dtype


@contextlib.contextmanager
def unchanged(model: torch.nn.Module, *, placement: bool = False) -> Iterator[None]:
    """Give back the caller's train/eval flag of every module, every parameter's `.grad` and the
    global RNG states (Python, NumPy, torch CPU and CUDA), however the body leaves them:
    measuring a model must not change how the caller's next step trains or what its next
    random draw is.

    placement: also put every parameter and buffer back on its own device, dtype and memory
    (the same Parameter objects, so an optimizer holding them still steps the model), for a
    live model that the body may move (`.to(device)`); off, a loaded model stays where the
    body put it, so passes after the first do not move it again."""
    import numpy as np

    modes = [(m, m.training) for m in model.modules()]
    # References, not copies: what the body could do is replace them (a move, zero_grad).
    grads = [(p, p.grad) for p in model.parameters()]
    data = [(p, p.data) for p in model.parameters()] if placement else []
    buffers = _buffer_slots(model) if placement else []
    py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    # CUDA is only read if already started: starting it here would cost a CPU-only caller.
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, tensor in data:
            if param.data_ptr() != tensor.data_ptr() or param.device != tensor.device:
                param.data = tensor
        for module, name, tensor in buffers:
            module._buffers[name] = tensor
        for param, grad in grads:
            # A grad left on another device than its parameter would break the next step.
            if param.grad is not grad and (grad is None or grad.device == param.device):
                param.grad = grad
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        elif torch.cuda.is_initialized():
            # CUDA started inside: its generators go back to their freshly seeded state.
            for index in range(torch.cuda.device_count()):
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(torch.cuda.initial_seed())


def _buffer_slots(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Any]]:
    return [(m, name, b) for m in model.modules() for name, b in m._buffers.items()]


@dataclass
class RunContext:
    """How the model runs in this pass; probes that need extra forwards call `forward`."""

    model: torch.nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    seed: int = 0
    loaded: Any = None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(features, pre-logits, logits) for a batch, in float32."""
        with torch.inference_mode(), self.autocast():
            feats = self.model.forward_features(self.prepare(images))
            pre = self.model.forward_head(feats, pre_logits=True)
            logits = self.model.forward_head(feats)
        return _float(feats), _float(pre), _float(logits)


def _float(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float()
    if isinstance(x, (tuple, list)):
        return type(x)(_float(v) for v in x)
    return x


def split_tokens(value: Any, tap: LayerTap) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn what a hook saw into (grid tokens (B, n, D), prefix tokens (B, p, D) or None)."""
    if tap.layout == PIT:
        x, prefix = value
        return x.flatten(2).transpose(1, 2).float(), prefix.float()
    if isinstance(value, (tuple, list)):
        value = value[0]
    if tap.layout == NLC:
        p = tap.num_prefix
        return value[:, p:].float(), (value[:, :p].float() if p else None)
    if tap.layout == NHWC:
        b, h, w, d = value.shape
        return value.reshape(b, h * w, d).float(), None
    if tap.layout == NCHW:
        return value.flatten(2).transpose(1, 2).float(), None
    raise ValueError(f"unknown token layout {tap.layout}")


class LayerRecorder:
    """Forward hooks that keep the tokens of every tapped layer for the current batch."""

    def __init__(self, model: torch.nn.Module, taps: Sequence[LayerTap]):
        self.taps = list(taps)
        self.seen: dict[str, Any] = {}
        self._handles = []
        for tap in self.taps:
            module = module_at(model, tap.module)
            if tap.where == "input":
                hook = module.register_forward_pre_hook(self._pre(tap.name))
            else:
                hook = module.register_forward_hook(self._post(tap.name))
            self._handles.append(hook)

    def _pre(self, name: str):
        def hook(_module, args):
            self.seen[name] = args[0]

        return hook

    def _post(self, name: str):
        def hook(_module, _args, output):
            self.seen[name] = output

        return hook

    def collect(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        grids, prefixes = {}, {}
        for tap in self.taps:
            if tap.name not in self.seen:
                continue
            grid, prefix = split_tokens(self.seen[tap.name], tap)
            grids[tap.name] = grid
            if prefix is not None:
                prefixes[tap.name] = prefix
        self.seen.clear()
        return grids, prefixes

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class RunSummary:
    results: list[Result]
    n_images: int
    n_unreadable: int
    seconds: float
    world_size: int = 1
    extra: dict = field(default_factory=dict)


def _batch_parts(batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Accept data.Batch objects or plain (images, targets) pairs."""
    if hasattr(batch, "images"):
        return batch.images, batch.targets, int(getattr(batch, "n_unreadable", 0))
    images, targets = batch[0], batch[1]
    return images, targets, 0


def make_progress(total: int | None, quiet: bool):
    """A rich progress bar on stderr, silent when not a TTY or when asked to be quiet."""
    if quiet or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    return progress


def run_probes(
    model: torch.nn.Module,
    batches: Iterable[Any],
    probes: Sequence[Probe],
    *,
    device: torch.device | str = "cpu",
    amp: str = "off",
    channels_last: bool = False,
    seed: int = 0,
    loaded: Any = None,
    total_images: int | None = None,
    quiet: bool = True,
    description: str = "vitdiag",
) -> RunSummary:
    """One pass over `batches`: each batch is forwarded once and every probe sees its taps.

    The model's train/eval flags and the global RNG states are as the caller left them
    afterwards (`unchanged`)."""
    with unchanged(model):
        return _run_probes(
            model,
            batches,
            probes,
            device=device,
            amp=amp,
            channels_last=channels_last,
            seed=seed,
            loaded=loaded,
            total_images=total_images,
            quiet=quiet,
            description=description,
        )


def _run_probes(
    model: torch.nn.Module,
    batches: Iterable[Any],
    probes: Sequence[Probe],
    *,
    device: torch.device | str,
    amp: str,
    channels_last: bool,
    seed: int,
    loaded: Any,
    total_images: int | None,
    quiet: bool,
    description: str,
) -> RunSummary:
    ctx = _run_context(model, device, amp, channels_last, seed, loaded)
    forward = SharedForward(ctx, probes)
    start = time.perf_counter()
    try:
        progress = make_progress(total_images, quiet)
        n_images, n_bad = _feed(batches, probes, forward, progress, total_images, description)
    finally:
        forward.close()
    # The probes' sums become the sums over every process before any of them computes.
    n_images, n_bad, world = reduce_pass(probes, n_images, n_bad, ctx.device)
    if n_images == 0:
        raise VitdiagError(
            "no image could be read from the dataset; check the path and that it holds image files."
        )
    results = [p.compute() for p in probes]
    return RunSummary(results, n_images, n_bad, time.perf_counter() - start, world)


def _run_context(
    model: torch.nn.Module,
    device: torch.device | str,
    amp: str,
    channels_last: bool,
    seed: int,
    loaded: Any,
) -> RunContext:
    """The model on its device, in eval mode (and channels-last if asked), with the AMP dtype."""
    if not isinstance(device, torch.device):
        device = resolve_device(device)
    amp_dtype = resolve_amp(amp, device)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return RunContext(model, device, amp_dtype, channels_last, seed, loaded)


class SharedForward:
    """The one forward per batch, keeping what the probes asked for (`Probe.needs`): layer
    tokens and the patch embedding through hooks, pre-logits and logits from the head."""

    def __init__(self, ctx: RunContext, probes: Sequence[Probe]) -> None:
        self.ctx = ctx
        self.needs: set[str] = set()
        for p in probes:
            self.needs |= set(p.needs)
        model = ctx.model
        self.recorder = (
            LayerRecorder(model, family_of(model).layer_taps(model))
            if LAYERS in self.needs
            else None
        )
        # The patch embedding is computed by the forward anyway: a hook keeps it rather than a
        # probe running patch_embed a second time.
        self._patch_seen: dict[str, Any] = {}
        self._patch_hook = None
        if PATCH in self.needs and getattr(model, "patch_embed", None) is not None:
            self._patch_hook = model.patch_embed.register_forward_hook(
                lambda _m, _a, out: self._patch_seen.__setitem__("out", out)
            )

    def taps(self, images: torch.Tensor, targets: torch.Tensor) -> Taps:
        """Forward one batch and hand back its taps (images and targets on the device)."""
        ctx, model = self.ctx, self.ctx.model
        taps = Taps(images=images, targets=targets.to(torch.int64), context=ctx)
        with torch.inference_mode(), ctx.autocast():
            x = ctx.prepare(images)
            feats = model.forward_features(x)
            if PRELOGITS in self.needs:
                taps.prelogits = _float(model.forward_head(feats, pre_logits=True))
            if LOGITS in self.needs:
                taps.logits = _float(model.forward_head(feats))
        taps.features = _float(feats) if FEATURES in self.needs else None
        taps.patch = self._patch_seen.pop("out", None)
        taps.images = x
        taps.targets = taps.targets.to(ctx.device, non_blocking=True)
        if self.recorder is not None:
            taps.layers, taps.prefix = self.recorder.collect()
        return taps

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        if self._patch_hook is not None:
            self._patch_hook.remove()


def _feed(
    batches: Iterable[Any],
    probes: Sequence[Probe],
    forward: SharedForward,
    progress: Any,
    total_images: int | None,
    description: str,
) -> tuple[int, int]:
    """Every batch through the shared forward into every probe; (images read, unreadable)
    by this process."""
    # The loader read this process's shard by the stride rule; each batch's global positions
    # follow from it, so probes see global indices and never which process they run in.
    shard = current_shard()
    n_images = n_bad = 0
    task = None
    try:
        if progress is not None:
            progress.start()
            task = progress.add_task(description, total=total_images)
        for batch in batches:
            images, targets, bad = _batch_parts(batch)
            n_bad += bad
            if images.shape[0] == 0:
                continue
            taps = forward.taps(images, targets)
            taps.positions = shard.positions(n_images, images.shape[0])
            # Source indices and views made by the loader's workers (data.Batch), if any.
            given = getattr(batch, "indices", None)
            taps.indices = taps.positions if given is None else given
            taps.views = getattr(batch, "views", None)
            for probe in probes:
                probe.update(taps)
            n_images += images.shape[0]
            if progress is not None:
                progress.update(task, advance=images.shape[0])
    finally:
        if progress is not None:
            progress.stop()
    return n_images, n_bad
