"""Which output index each class of a labelled dataset is: the ground truth of every metric.

A source numbers its classes by folder order (``classes[i]`` is target ``i``); the model
numbers its outputs its own way. `class_indices` turns the first into the second:

- ``name``: the model's index of each class name (its ``label_names`` / ``id2label``), so a
  folder missing a class, or folders that sort differently from the model's order, still give
  each image its true index; a partial match is refused, since guessing the rest would shift
  labels silently;
- ``positional``: folder order is output order, the only information when the model carries no
  names. A held-out split is numbered by the training data's class list (``reference``), so a
  ``--val`` that lacks one of ``--data``'s classes keeps the indices ``--data`` gives.

``auto`` is ``name`` when the model has names, else ``positional``; a dataset none of whose
class names is among the model's (ImageNet synset folders against readable names) is taken
positionally under ``auto``, and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vitdiag.errors import VitdiagError

LABEL_MODES = ("auto", "name", "positional")
_SHOWN = 5  # unmatched folder names an error lists before "..."


@dataclass(frozen=True)
class ClassIndices:
    """``index[i]``: the output index of the source's class ``i``; ``rule``: one line for the
    report (``matched by name (10 of the model's 10 classes)``)."""

    index: list[int]
    rule: str

    @property
    def identity(self) -> bool:
        return self.index == list(range(len(self.index)))


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def _by_name(classes: Sequence[str], names: Sequence[str], where: str) -> ClassIndices:
    index = {n: i for i, n in enumerate(names)}
    unmatched = [c for c in classes if c not in index]
    if unmatched:
        raise VitdiagError(
            f"{len(unmatched)} of the {len(classes)} class folders of {where} are not among the "
            f"model's {len(names)} class names: {_listed(unmatched)}; rename them to the "
            "model's label names, or pass --labels positional to take folder order as output "
            "order."
        )
    rule = f"matched by name ({len(classes)} of the model's {len(names)} classes)"
    return ClassIndices([index[c] for c in classes], rule)


def _positional(
    classes: Sequence[str], reference: Sequence[str] | None, where: str, why: str
) -> ClassIndices:
    if reference is None or list(reference) == list(classes):
        return ClassIndices(
            list(range(len(classes))), f"positional (folder order = output order{why})"
        )
    index = {c: i for i, c in enumerate(reference)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise VitdiagError(
            f"{len(unknown)} class folders of {where} are not among --data's classes: "
            f"{_listed(unknown)}; give --val the classes of --data (folder order is the only "
            "way to number them when the model carries no class names)."
        )
    rule = f"positional (--data's folder order = output order, {where} numbered by name on it{why})"
    return ClassIndices([index[c] for c in classes], rule)


def class_indices(
    classes: Sequence[str],
    names: Sequence[str] | None,
    mode: str = "auto",
    *,
    reference: Sequence[str] | None = None,
    where: str = "the data",
) -> ClassIndices:
    """The output index of each of `classes` (a source's, in target order).

    names: the model's class names in output order (None: it has none). mode: auto, name or
    positional. reference: the training data's classes, which number a held-out split's in
    positional mode. where: how messages name the data (``--val``).
    """
    if mode not in LABEL_MODES:
        raise VitdiagError(f"--labels must be {', '.join(LABEL_MODES)}, got {mode!r}.")
    names = [str(n) for n in names] if names else None
    if mode == "name" and names is None:
        raise VitdiagError(
            "--labels name needs the model's class names (label_names or id2label) and this "
            "checkpoint has none; use --labels positional."
        )
    if mode == "positional" or names is None:
        return _positional(classes, reference, where, "")
    if mode == "auto" and not set(classes) & set(names):
        # Different vocabularies (synset folders, readable names): no name to match on.
        why = f"; none of the {len(classes)} folder names is among the model's class names"
        return _positional(classes, reference, where, why)
    return _by_name(classes, names, where)
