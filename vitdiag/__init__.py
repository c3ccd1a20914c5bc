"""vitdiag: diagnostics for Vision Transformer checkpoints.

The top-level import stays light (no torch) so that `vitdiag --help` is instant; the library API
is imported on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "load": ("vitdiag.model", "load"),
    "LoadedModel": ("vitdiag.model", "LoadedModel"),
    "open_dataset": ("vitdiag.data", "open_dataset"),
    "run_probes": ("vitdiag.engine", "run_probes"),
    "run_all": ("vitdiag.runner", "run_all"),
    "Tracker": ("vitdiag.tracker", "Tracker"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vitdiag' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
