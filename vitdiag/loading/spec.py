"""What loading decides: the architecture, its arguments and native size (`Spec`), and every
hidden choice on the way (`Assumption`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Assumption:
    """A choice the weights do not show, how it was made, and the option that overrides it."""

    name: str
    value: str
    source: str
    override: str


@dataclass
class Spec:
    arch: str
    build_kwargs: dict  # model args incl. num_classes, excl. img_size
    native: tuple[int, int]
    native_source: str
    decided_by: str
    overlay: dict  # pretrained_cfg fields recorded with the checkpoint
    overlay_source: dict  # field -> where it came from
    assumptions: list[Assumption]  # architecture-level ones (matching, heads)
    label_names: list | None = None
    heads_source: str = ""
    source_kind: str = "timm"  # or the library the weights were converted from
    eps_source: str = ""  # where the LayerNorm eps comes from, when not timm's default
