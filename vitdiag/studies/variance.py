"""What `vitdiag variance` adds to the variance-shift study (SPEC §1, 2405.14115): the notes on
what its data could not measure. The study itself (`variance_study`, `VarianceStudy`) lives
below the runner, in `vitdiag.size_sweep`, because `vitdiag report` runs it too and the runner
never calls a study.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitdiag.data import ImageSource
    from vitdiag.size_sweep import VarianceStudy


def data_notes(study: VarianceStudy, source: ImageSource | None) -> list[str]:
    """What a study on `source` (None: no images) could not measure, and the images it skipped."""
    if source is None:
        return [
            "Var[X_s], r, shift, k̂, the empirical c and accuracy under each rescale need "
            "images: give --data DIR (labelled folders for accuracy)."
        ]
    notes = []
    if not source.labelled:
        notes.append("the data has no labels, so accuracy under each rescale is not shown.")
    if study.n_unreadable:
        notes.append(
            f"{study.n_unreadable} unreadable image(s) were skipped (--strict fails instead)."
        )
    return notes
