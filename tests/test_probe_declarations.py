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


def test_the_readmes_adding_a_probe_recipe_works_in_one_module():
    """The README's recipe, run as written: defining the class is all it takes for run_all."""
    import gc
    import re
    from pathlib import Path

    import torch

    import vitdiag
    from vitdiag.probes.registry import probe_classes

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Adding a probe", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    import sys
    import types

    # The recipe's module, as if saved to vitdiag/probes/prelogit_norm.py.
    module = types.ModuleType("vitdiag.probes.prelogit_norm")
    sys.modules[module.__name__] = module
    exec(compile(code, "README.md", "exec"), module.__dict__)
    probe_classes.cache_clear()
    try:
        assert "prelogit_norm" in probe_classes()
        loaded = vitdiag.load("fixtures/models/vit_nomix")
        results = vitdiag.run_all(
            loaded, "fixtures/data/val", probes="prelogit_norm", limit=12, batch_size=5, workers=0
        )
        got = results[0].metrics
        from vitdiag.runner import Settings, loader_for, open_source, transform_at

        settings = Settings(limit=12, batch_size=5, workers=0)
        source = open_source("fixtures/data/val", settings)
        transform = transform_at(loaded.data_config, settings, loaded.img_size)
        loader = loader_for(source, transform, settings)
        norms = []
        with torch.inference_mode():
            for batch in loader:
                feats = loaded.model.forward_features(batch.images)
                pre = loaded.model.forward_head(feats, pre_logits=True)
                norms.append(pre.double().norm(dim=1))
        want = torch.cat(norms)
        assert got["n"] == 12
        assert abs(got["mean"] - float(want.mean())) <= 1e-12 * float(want.mean())
    finally:
        del sys.modules[module.__name__]
        gc.collect()
        probe_classes.cache_clear()
    assert "prelogit_norm" not in probe_classes()
