"""What one run needs besides the model, in one typed value: the settings, the data of each
split, and where and how the forward runs (device, AMP, memory format, seed, progress).

The runner builds one `Runtime` per `run_all` and hands it down its passes; a study is given
`engine_options()` for the passes it runs itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from vitdiag.data import ImageSource
    from vitdiag.settings import Settings


class EngineOptions(TypedDict):
    """Where and how `engine.run_probes` runs a pass."""

    device: str
    amp: str
    channels_last: bool
    seed: int
    quiet: bool


@dataclass(frozen=True)
class Runtime:
    """One run: its settings, the training data (``source``) and the held-out data
    (``val_source``; None: the training data serves both)."""

    settings: Settings
    source: ImageSource | None = None
    val_source: ImageSource | None = None

    @property
    def device(self) -> str:
        return self.settings.device

    @property
    def amp(self) -> str:
        return self.settings.amp

    @property
    def channels_last(self) -> bool:
        return self.settings.channels_last

    @property
    def quiet(self) -> bool:
        return self.settings.quiet

    def engine_options(self) -> EngineOptions:
        """The engine's keyword arguments for every pass of this run."""
        s = self.settings
        return EngineOptions(
            device=s.device, amp=s.amp, channels_last=s.channels_last, seed=s.seed, quiet=s.quiet
        )

    def splits(self) -> list[tuple[str, ImageSource | None]]:
        """(role, data) of each engine pass: one pass when there is one dataset, else the
        training data ("data") and the held-out data ("val")."""
        if self.source is not None and (self.val_source is None or self.val_source is self.source):
            return [("data", self.source)]
        return [("data", self.source), ("val", self.val_source)]
