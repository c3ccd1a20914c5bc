"""Models at a size for the studies: the native model, and a model rebuilt at another size
with its table set from the native one (resampled, times c)."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

from vitdiag.posembed import as_hw, require_abs_pos, set_table, target_table

if TYPE_CHECKING:
    from vitdiag.model import LoadedModel


def native_of(loaded: LoadedModel) -> LoadedModel:
    """The model built at the size its table was trained for."""
    from vitdiag.model import at_size

    if as_hw(loaded.img_size) == as_hw(loaded.native_size):
        return loaded
    return at_size(loaded, as_hw(loaded.native_size))


def build_at_size(
    native: LoadedModel, size: Any, *, c: float = 1.0, interpolation: str = "bicubic"
) -> LoadedModel:
    """`native` rebuilt at `size`, its table = native table resampled (timm's way) × c.

    The architecture comes from `model.at_size` (which also rejects sizes the patch grid cannot
    take, naming valid ones); the table is then set here from the native table, so the model
    that runs is exactly the one `write_checkpoint` saves, whatever at_size did to the table.
    """
    from vitdiag.model import at_size

    require_abs_pos(native.model)
    same = as_hw(size) == as_hw(native.img_size)
    if same and c == 1.0:
        return native
    target = at_size(native, as_hw(size))
    if target is native or target.model is native.model:
        # a rescaled table must never reach the caller's own model
        target = dataclasses.replace(target, model=copy.deepcopy(native.model))
    set_table(target.model, target_table(native.model, target.model, c, interpolation))
    return target
