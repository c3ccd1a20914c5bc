"""Thresholds on named result values, for CI: parse a config, judge results, write JUnit XML.

A config is a TOML file, ``vitdiag.toml`` (keys at the top level) or a ``pyproject.toml``
(``[tool.vitdiag]``)::

    data = "fixtures/data/val"        # evaluation images (eval, calibration, variance)
    train = "fixtures/data/train"     # optional: training images (collapse, similarity, ...)
    sizes = [48]                      # optional: extra sizes for variance (also read from names)
    limit = 200                       # optional: at most this many images per dataset
    views = 4                         # optional: any run setting by its name (see the README)
    checks = [
      "eval.top1 >= 0.85",
      "collapse.nc1 < 0.5",
      "variance.shift@48 within [0.8, 1.25]",
    ]

A metric is ``<probe>.<key>`` with key one of that probe's ``Result.metrics``; the names a
probe can report are its own declaration. A config is validated (exit 2) before any model is
loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitdiag.errors import VitdiagError

if TYPE_CHECKING:
    from vitdiag.settings import Settings

OPS = ("<", "<=", ">", ">=")
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_METRIC = r"[A-Za-z_][\w.@/+\-]*"
_COMPARE = re.compile(rf"^\s*(?P<metric>{_METRIC})\s*(?P<op><=|>=|<|>)\s*(?P<value>{_NUM})\s*$")
_WITHIN = re.compile(
    rf"^\s*(?P<metric>{_METRIC})\s+within\s*\[\s*(?P<lo>{_NUM})\s*,\s*(?P<hi>{_NUM})\s*\]\s*$"
)

# Probes declare the metric names they report as templates (`Probe.check_metrics`). They let a
# config be checked before a model is loaded; after the run the result's own metric names are
# the authority (a layer name, for one, depends on the model). tests/test_report.py pins the
# templates to the probes' real results. The placeholders:
_PH = {
    "<head>.": r"(?:(?:dist|head\d+)\.)?",
    "<size>": r"\d+(?:x\d+)?",
    "<interp>": r"(?:bicubic|bilinear|nearest)",
    "<rescale>": rf"(?:none|sqrt-axis|sqrt-area|empirical|{_NUM})",
    "<layer>": r"[A-Za-z0-9_.]+",
    "<aug>": r"[a-z][a-z0-9-]*",
    "<lambda>": _NUM,
    "[_global]": r"(?:_global)?",
    "[_wmean]": r"(?:_wmean)?",
}


def metric_templates() -> dict[str, tuple[str, ...]]:
    """probe -> the templates of its metric names, as each probe class declares them (read
    without importing the probes, so validating a config stays free of torch)."""
    from vitdiag.probes.registry import declared

    ranked = sorted(declared().values(), key=lambda f: f.get("headline_rank", 0))
    return {f["name"]: tuple(f.get("check_metrics", ())) for f in ranked}


_PATTERNS: dict[str, list[re.Pattern]] = {}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"(<head>\.|<\w+>|\[_\w+\])", template)
    return re.compile("".join(_PH.get(p, re.escape(p)) for p in parts) + "$")


def known_metric(probe: str, key: str) -> bool:
    """Whether `key` can be a metric of `probe` (by the templates its probe declares)."""
    if probe not in _PATTERNS:
        _PATTERNS[probe] = [_compile(t) for t in metric_templates().get(probe, ())]
    return any(p.match(key) for p in _PATTERNS[probe])


def _readable(templates: Sequence[str]) -> str:
    text = ", ".join(t.replace("<head>.", "").replace("[_wmean]", "") for t in templates)
    if any("<head>." in t for t in templates):
        text += " (a second head's metrics start with dist., e.g. dist.nc1"
        if any("[_wmean]" in t for t in templates):
            text += "; with imbalanced classes the μ_G ones also come with _wmean"
        text += ")"
    return text


# -- thresholds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """`metric op value`, or `metric within [low, high]` (both ends included)."""

    text: str
    metric: str
    op: str  # one of OPS or "within"
    value: float = math.nan
    low: float = math.nan
    high: float = math.nan
    line: int | None = None

    @property
    def probe(self) -> str:
        return self.metric.split(".", 1)[0]

    @property
    def key(self) -> str:
        return self.metric.split(".", 1)[1]

    def expected(self) -> str:
        if self.op == "within":
            return f"within [{self.low:g}, {self.high:g}]"
        return f"{self.op} {self.value:g}"

    def holds(self, measured: float) -> bool:
        if measured is None or not math.isfinite(measured):
            return False
        if self.op == "within":
            return self.low <= measured <= self.high
        return {
            "<": measured < self.value,
            "<=": measured <= self.value,
            ">": measured > self.value,
            ">=": measured >= self.value,
        }[self.op]


def _where(source: str, line: int | None) -> str:
    return f"{source} line {line}" if line else source


def parse_threshold(text: str, *, source: str = "check", line: int | None = None) -> Threshold:
    """One threshold string; a VitdiagError naming `source` and `line` when it is not one.
    A check on findings (`findings.max_severity < fail`) is a `FindingCheck`."""
    if isinstance(text, str) and text.strip().startswith("findings."):
        from vitdiag.findings.gate import parse_finding_check

        return parse_finding_check(text, _where(source, line), line)  # type: ignore[return-value]
    if not isinstance(text, str):
        raise VitdiagError(
            f'{_where(source, line)}: every check must be a string like "eval.top1 >= 0.85", '
            f"got {text!r}."
        )
    m = _WITHIN.match(text)
    if m:
        lo, hi = float(m["lo"]), float(m["hi"])
        if lo > hi:
            raise VitdiagError(
                f"{_where(source, line)}: {text!r} has an empty range (low {lo:g} > high {hi:g})."
            )
        t = Threshold(text, m["metric"], "within", low=lo, high=hi, line=line)
    elif m := _COMPARE.match(text):
        t = Threshold(text, m["metric"], m["op"], value=float(m["value"]), line=line)
    else:
        raise VitdiagError(
            f"{_where(source, line)}: {text!r} is not a threshold; write METRIC OP NUMBER with OP "
            'one of <, <=, >, >= (e.g. "collapse.nc1 < 0.5") or METRIC within [LOW, HIGH].'
        )
    validate_metric(t, source)
    return t


def validate_metric(t: Threshold, source: str = "check") -> None:
    """Probe known and key plausible for that probe; the message lists the valid names."""
    metrics = metric_templates()
    if "." not in t.metric:
        raise VitdiagError(
            f"{_where(source, t.line)}: {t.metric!r} names no probe; write <probe>.<metric>, "
            f"e.g. eval.top1 (probes: {', '.join(metrics)})."
        )
    if t.probe not in metrics:
        raise VitdiagError(
            f"{_where(source, t.line)}: {t.probe!r} in {t.metric!r} is not a probe; "
            f"probes: {', '.join(metrics)}."
        )
    if not known_metric(t.probe, t.key):
        raise VitdiagError(
            f"{_where(source, t.line)}: {t.key!r} is not a metric of {t.probe}; valid "
            f"{t.probe} metrics: {_readable(metrics[t.probe])}."
        )


def sizes_from(thresholds: Iterable[Threshold]) -> list[int | tuple[int, int]]:
    """Test sizes that variance thresholds name (shift@48, top1@48x64/none, ...)."""
    out: list[int | tuple[int, int]] = []
    for t in thresholds:
        if t.probe != "variance":
            continue
        m = re.search(r"@(\d+)(?:x(\d+))?(?:/|$)", t.key)
        if m:
            size = int(m[1]) if m[2] is None else (int(m[1]), int(m[2]))
            if size not in out:
                out.append(size)
    return out


# -- config -------------------------------------------------------------------------------------


@dataclass
class CheckConfig:
    """What `vitdiag check` reads from vitdiag.toml or [tool.vitdiag].

    options: the run settings the config gives, by `Settings` field (its keys are the fields
    declared with `config=True`); read as attributes too, `cfg.limit` being the config's value
    or the command line's default."""

    path: Path
    checks: list[Threshold]
    data: str | None = None
    train: str | None = None
    sizes: list[int | tuple[int, int]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    practical: dict[str, float] = field(default_factory=dict)  # [findings.practical]

    def __getattr__(self, name: str) -> Any:
        from vitdiag.settings import cli_default, config_keys

        if name != "options" and name in config_keys():
            return self.options.get(name, cli_default(name))
        raise AttributeError(name)

    @property
    def probes(self) -> set[str] | None:
        """The probes the checks read; None when a check on every finding needs them all."""
        wanted: set[str] = set()
        for t in self.checks:
            if t.probe != "findings":
                wanted.add(t.probe)
            elif (more := t.probes()) is None:
                return None
            else:
                wanted |= more
        return wanted

    @property
    def all_sizes(self) -> list[int | tuple[int, int]]:
        out = list(self.sizes)
        out += [s for s in sizes_from(self.checks) if s not in out]
        return out


# the config's own keys (data and sizes for the run, checks), around the run settings' keys
_OWN_TYPES: dict[str, tuple[type, ...]] = {
    "data": (str,),
    "train": (str,),
    "sizes": (list,),
    "findings": (dict,),
}
_KIND = {
    int: "an integer",
    str: "a string",
    list: "a list",
    float: "a number",
    bool: "true or false",
    dict: "a table",
}


def _types() -> dict[str, tuple[type, ...]]:
    """config key -> the TOML types it takes: a run setting's from its declared type (a comma
    list on the command line may be a TOML list), then checks."""
    from vitdiag.settings import config_keys
    from vitdiag.settings import options as declared

    out = dict(_OWN_TYPES)
    for key in config_keys():
        kinds = tuple(t for t in getattr(declared()[key].type, "__args__", (declared()[key].type,)))
        kinds = tuple(t for t in kinds if t is not type(None))
        out[key] = (*kinds, list) if str in kinds else (*kinds, int) if float in kinds else kinds
    out["checks"] = (list,)
    return out


def _checked_value(path: Path, key: str, value: Any, kinds: tuple[type, ...]) -> Any:
    """One config value of the right TOML type, a run setting also within its declared range."""
    from vitdiag.settings import check_option, config_keys

    wrong_bool = isinstance(value, bool) and bool not in kinds
    if not isinstance(value, kinds) or wrong_bool:
        raise VitdiagError(
            f"{path}: {key} must be {' or '.join(_KIND[t] for t in kinds)}, got {value!r}."
        )
    if key not in config_keys():
        return value
    if isinstance(value, list):  # a TOML list for a comma list
        value = ",".join(str(v) for v in value)
    check_option(key, value, where=f"{path}: {key}")
    return value


def _toml():
    try:
        import tomllib

        return tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli

            return tomli
        except ModuleNotFoundError:
            raise VitdiagError(
                "reading a TOML config needs Python 3.11 or newer, or `pip install tomli`."
            ) from None


def find_config(start: Path | None = None) -> Path:
    """./vitdiag.toml, else ./pyproject.toml when it has a [tool.vitdiag] table."""
    here = Path(start or ".")
    if (here / "vitdiag.toml").is_file():
        return here / "vitdiag.toml"
    py = here / "pyproject.toml"
    if py.is_file() and re.search(r"^\s*\[tool\.vitdiag\]", py.read_text(), re.M):
        return py
    raise VitdiagError(
        "no config found: give --config FILE, or put vitdiag.toml (or a [tool.vitdiag] table "
        "in pyproject.toml) in the current folder."
    )


def _line_of(lines: Sequence[str], text: str, after: int) -> int | None:
    """1-based line holding the string `text` (searched from line `after` on), if found."""
    for needle in (text, text.replace("\\", "\\\\").replace('"', '\\"')):
        for i in range(max(after, 0), len(lines)):
            if needle in lines[i]:
                return i + 1
    return None


def _resolve_data(value: str, base: Path, config: Path, key: str) -> str:
    # Paths are relative to the config file (CI runs from anywhere); specs like
    # "synthetic:16" or "torch/cifar10:ROOT" do not exist on disk and pass through.
    p = Path(value).expanduser()
    if p.is_absolute():
        return value
    if (base / p).exists():
        return str(base / p)
    if p.exists() and Path.cwd().resolve() != base:
        # found only from the working directory: reading it would make the result depend on
        # where CI happens to start
        raise VitdiagError(
            f"{config}: {key} = {value!r} is not found next to the config ({base / p}); paths "
            "in a config are relative to its folder: write it from there or give an absolute "
            "path."
        )
    return value


def load_config(path: Path | str) -> CheckConfig:
    """Read and validate a config; any problem is a VitdiagError (exit 2) naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise VitdiagError(f"config {path} does not exist; give the path of a vitdiag.toml.")
    raw = path.read_text(encoding="utf-8")
    toml = _toml()
    try:
        doc = toml.loads(raw)
    except toml.TOMLDecodeError as e:
        raise VitdiagError(f"{path}: not valid TOML ({e}).") from None
    section = "[tool.vitdiag]"
    table = doc.get("tool", {}).get("vitdiag") if isinstance(doc.get("tool"), dict) else None
    if table is None:
        if path.name == "pyproject.toml":
            raise VitdiagError(f"{path} has no [tool.vitdiag] table; add one with checks = [...].")
        table, section = doc, "the top level"
    types = _types()
    unknown = sorted(set(table) - set(types) - ({"tool"} if table is doc else set()))
    if unknown:
        raise VitdiagError(
            f"{path}: unknown key(s) {', '.join(unknown)} in {section}; "
            f"valid keys: {', '.join(types)}."
        )
    values = {k: _checked_value(path, k, v, types[k]) for k, v in table.items() if k in types}
    base = path.resolve().parent
    return CheckConfig(
        path=path,
        checks=_thresholds(path, raw, values.get("checks"), section),
        data=_resolve_data(values["data"], base, path, "data") if "data" in values else None,
        train=_resolve_data(values["train"], base, path, "train") if "train" in values else None,
        sizes=_sizes(path, values.get("sizes", [])),
        options={k: v for k, v in values.items() if k not in (*_OWN_TYPES, "checks")},
        practical=_practical(path, values.get("findings", {})),
    )


def _practical(path: Path, table: dict) -> dict[str, float]:
    """[findings.practical]: the practical sizes that let a finding be `fail`, by name."""
    from vitdiag.findings.constants import PRACTICAL

    unknown = sorted(set(table) - {"practical"})
    if unknown:
        raise VitdiagError(f"{path}: [findings] takes only a practical table, not {unknown}.")
    out = {}
    for name, value in (table.get("practical") or {}).items():
        if name not in PRACTICAL:
            raise VitdiagError(
                f"{path}: [findings.practical] has no {name!r}; names: {', '.join(PRACTICAL)}."
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise VitdiagError(f"{path}: findings.practical.{name} must be a number >= 0.")
        out[name] = float(value)
    return out


def _thresholds(path: Path, raw: str, checks: Any, section: str) -> list[Threshold]:
    """The config's checks, each naming its line in the file."""
    if not checks:
        raise VitdiagError(
            f'{path}: no checks; add checks = ["eval.top1 >= 0.85", ...] to {section}.'
        )
    lines = raw.splitlines()
    parsed, after = [], 0
    for text in checks:
        line = _line_of(lines, text, after) if isinstance(text, str) else None
        parsed.append(parse_threshold(text, source=str(path), line=line))
        after = line or after
    return parsed


def _sizes(path: Path, items: list) -> list[int | tuple[int, int]]:
    sizes: list[int | tuple[int, int]] = []
    for s in items:
        if isinstance(s, int) and not isinstance(s, bool) and s > 0:
            sizes.append(s)
        elif isinstance(s, str) and re.fullmatch(r"\d+x\d+", s):
            sizes.append(tuple(int(v) for v in s.split("x")))  # type: ignore[arg-type]
        else:
            raise VitdiagError(
                f'{path}: sizes must be positive pixel sizes like [224, 384] or "224x320", '
                f"got {s!r}."
            )
    return sizes


# -- judging --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    threshold: Threshold
    measured: float | None
    passed: bool
    shown: str | None = None  # the measured value in words (a check on findings)

    @property
    def message(self) -> str:
        t = self.threshold
        if self.shown is not None:
            verdict = "ok" if self.passed else "FAILED"
            return f"{t.metric} = {self.shown}, expected {t.expected()}: {verdict}"
        if self.measured is None or not math.isfinite(self.measured):
            return f"{t.metric} was not measured (NaN), expected {t.expected()}"
        verdict = "ok" if self.passed else "FAILED"
        return f"{t.metric} = {self.measured:.6g}, expected {t.expected()}: {verdict}"


def judge(
    thresholds: Sequence[Threshold], results: Iterable[Any], findings: list[dict] | None = None
) -> list[Outcome]:
    """Compare each threshold with the measured value; a name the run did not produce is a
    config error (the valid names of that probe, as measured, are listed). Checks on findings
    are judged against `findings` (the run's, as `findings_of` gives them)."""
    by_probe = {r.probe: r.metrics for r in results}
    outcomes = []
    for t in thresholds:
        if t.probe == "findings":
            measured, passed, shown = t.judge(findings or [])  # type: ignore[attr-defined]
            outcomes.append(Outcome(t, measured, passed, shown))
            continue
        metrics = by_probe.get(t.probe)
        if metrics is None:
            raise VitdiagError(f"{t.metric}: the {t.probe} probe produced no result.")
        if t.key not in metrics:
            raise VitdiagError(
                f"{t.metric}: {t.key!r} is not a metric of {t.probe} for this model and data; "
                f"valid {t.probe} metrics: {', '.join(metrics)}."
            )
        value = metrics[t.key]
        value = None if value is None else float(value)
        outcomes.append(Outcome(t, value, t.holds(value)))
    return outcomes


def render_outcomes(
    outcomes: Sequence[Outcome], console: Any, title: str = "vitdiag check"
) -> None:
    from rich.table import Table as RichTable

    from vitdiag.report import fmt

    table = RichTable(title=title, title_justify="left")
    for col in ("check", "measured", "expected", "result"):
        table.add_column(col)
    for o in outcomes:
        result = "[green]pass[/green]" if o.passed else "[bold red]FAIL[/bold red]"
        measured = o.shown if o.shown is not None else fmt(o.measured)
        table.add_row(o.threshold.metric, measured, o.threshold.expected(), result)
    console.print(table)
    failed = sum(not o.passed for o in outcomes)
    if failed:
        console.print(f"[bold red]{failed} of {len(outcomes)} checks failed[/bold red]")
    else:
        console.print(f"[green]all {len(outcomes)} checks passed[/green]")


def junit_xml(
    outcomes: Sequence[Outcome],
    *,
    suite: str = "vitdiag check",
    seconds: float = 0.0,
    properties: dict[str, Any] | None = None,
) -> bytes:
    """JUnit XML: one testcase per threshold (name = the threshold as written), a failure
    element carrying the measured value for each one that did not hold."""
    import xml.etree.ElementTree as ET

    failures = sum(not o.passed for o in outcomes)
    counts = dict(tests=str(len(outcomes)), failures=str(failures), errors="0")
    root = ET.Element("testsuites", name="vitdiag", time=f"{seconds:.3f}", **counts)
    ts = ET.SubElement(root, "testsuite", name=suite, skipped="0", time=f"{seconds:.3f}", **counts)
    if properties:
        props = ET.SubElement(ts, "properties")
        for k, v in properties.items():
            ET.SubElement(props, "property", name=str(k), value="" if v is None else str(v))
    for o in outcomes:
        t = o.threshold
        case = ET.SubElement(ts, "testcase", classname=f"vitdiag.{t.probe}", name=t.text, time="0")
        if not o.passed:
            measured = o.shown or ("NaN" if o.measured is None else repr(o.measured))
            failure = ET.SubElement(
                case, "failure", type="threshold", message=o.message, measured=measured
            )
            failure.text = f"measured {t.metric} = {measured}; expected {t.expected()}"
    ET.indent(root)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="utf-8")


# -- what `vitdiag check` runs and writes --------------------------------------------------------


def run_settings(cfg: CheckConfig, given: Mapping[str, Any]) -> Settings:
    """The run's Settings, built as every command builds its own (`build_settings`, the same
    defaults): the config's run settings, overridden by those given on the command line
    (`given`, by field: device, amp, ..., --limit; None = not given)."""
    from vitdiag.settings import build_settings

    values = {**cfg.options, **{k: v for k, v in given.items() if v is not None}}
    try:
        return build_settings(values, invariance=cfg.probes is None or "invariance" in cfg.probes)
    except VitdiagError as e:  # the command line's values were checked before: the config's
        raise VitdiagError(f"{cfg.path}: {e}") from None


def findings_of(results: Any, model: dict, practical: dict[str, float] | None = None) -> dict:
    """The `findings` block of the run's results document (what `vitdiag report` would say)."""
    from vitdiag.findings import evaluate, findings_block
    from vitdiag.results import document, jsonable

    doc = jsonable(document("check", list(results), model, results.data or None))
    return findings_block(evaluate(doc, practical))


def check_document(
    outcomes: Sequence[Outcome], results: Any, model: dict, findings: dict | None = None
) -> dict:
    """The --json document: every result, the findings, then each check with what it measured."""
    from vitdiag.results import document, jsonable

    doc = document("check", list(results), model, results.data or None)
    if findings is not None:
        doc["findings"] = findings
    doc["checks"] = [
        {
            "check": x.threshold.text,
            "metric": x.threshold.metric,
            "expected": x.threshold.expected(),
            "measured": x.shown if x.shown is not None else x.measured,
            "passed": x.passed,
        }
        for x in outcomes
    ]
    return jsonable(doc)


def check_junit(
    outcomes: Sequence[Outcome], label: str, seconds: float, model: dict, config: Path
) -> bytes:
    return junit_xml(
        outcomes,
        suite=f"vitdiag check {label}",
        seconds=seconds,
        properties={
            "checkpoint": model.get("path"),
            "sha256": model.get("sha256"),
            "arch": model.get("arch"),
            "config": str(config),
        },
    )
