"""Models at a size for the studies: the native model, and a model rebuilt at another size
with its table set from the native one (resampled, times c). They live in `vitdiag.size_sweep`
(the variance study below the runner needs them); re-exported here for the studies."""

from __future__ import annotations

from vitdiag.size_sweep import build_at_size, native_of

__all__ = ["build_at_size", "native_of"]
