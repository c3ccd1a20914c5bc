"""Each probe declares its own facts; the registry finds them, and runner, check and the report
read them. These pin the declarations to what the probes really do."""

from __future__ import annotations

import subprocess
import sys

from vitdiag.probes.collapse import _MU_G_DEPENDENT, CollapseProbe
from vitdiag.probes.registry import (
    declared,
    fixed_headlines,
    headline_patterns,
    probe_classes,
)

REPORT_ORDER = [
    "classifier",
    "eval",
    "calibration",
    "variance",
    "collapse",
    "mixup_geometry",
    "similarity",
    "invariance",
]


def test_registry_finds_every_probe_in_report_order():
    assert list(probe_classes()) == REPORT_ORDER


def test_static_declarations_agree_with_the_imported_classes():
    # check reads the declarations without importing torch: both readings must agree.
    static = declared()
    assert list(static) == REPORT_ORDER
    for name, cls in probe_classes().items():
        for key, value in static[name].items():
            want = getattr(cls, key)
            assert (tuple(value) if isinstance(value, list) else value) == want, (name, key)


def test_declarations_are_read_without_torch():
    code = (
        "import sys; from vitdiag.check import metric_templates; m = metric_templates(); "
        "assert 'collapse' in m and 'torch' not in sys.modules, sorted(m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_collapse_check_names_follow_its_mu_g_dependent_metrics():
    wmean = [t for t in CollapseProbe.check_metrics if t.endswith("[_wmean]")]
    assert wmean == [f"<head>.{k}[_wmean]" for k in _MU_G_DEPENDENT]


def test_the_comparison_rows_come_from_the_declarations():
    assert fixed_headlines() == (
        "eval.top1",
        "eval.nll",
        "calibration.ece",
        "classifier.w_etf",
        "collapse.nc1",
        "collapse.nc2_etf_means",
        "collapse.nc3",
        "collapse.nc4",
        "mixup_geometry.lambda_star",
        "similarity.last_block",
        "similarity.max",
        "variance.r0",
    )
    import re

    patterns = headline_patterns()
    assert re.fullmatch(patterns["variance"], "shift@48")
    assert re.fullmatch(patterns["variance"], "top1@48/empirical")
    assert not re.fullmatch(patterns["variance"], "top1@48/sqrt-axis")
    assert re.fullmatch(patterns["invariance"], "mixup.linv")


def test_splits_and_labels_say_which_data_each_probe_reads():
    facts = {n: (c.split, c.needs_labels) for n, c in probe_classes().items()}
    assert facts == {
        "classifier": ("none", False),
        "eval": ("eval", False),
        "calibration": ("eval", True),
        "variance": ("eval", False),
        "collapse": ("train", True),
        "mixup_geometry": ("train", True),
        "similarity": ("train", False),
        "invariance": ("train", False),
    }
