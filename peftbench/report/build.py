"""From the tidy frame to tables and across-dataset comparisons (a pure function of the records).

Metrics are chosen per task: `metric` may be an exact name (`acc`, `map@200`) or a family, the name
without its cut-off K (`map`; `map_mixed` for `map@200_mixed`), which takes each dataset's own
metric of that family (UCDR: mAP@200 on DomainNet and Sketchy, mAP@all on TU-Berlin), so every
dataset of the task counts in the tests. Without `metric`, a task uses its first recorded metric
(its family when the name has an `@`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from peftbench.errors import UsageError
from peftbench.report import stats
from peftbench.report.aggregation import aggregate
from peftbench.report.tables import Cell, Column, Table, metric_name


def family(metric: str) -> str:
    """The metric without its cut-off K: `map@200` and `map@all` -> `map`; `map@200_mixed` -> `map_mixed`."""
    head, at, tail = metric.partition("@")
    if not at:
        return metric
    _k, underscore, suffix = tail.partition("_")
    return head + (f"_{suffix}" if underscore else "")


def metric_choices(frame: pd.DataFrame) -> list[str]:
    names = list(dict.fromkeys(frame["metric"]))
    fams = [f for f in dict.fromkeys(family(m) for m in names if "@" in m) if f not in names]
    return sorted(names) + sorted(fams)


def default_metric(frame: pd.DataFrame, task: str) -> str:
    first = str(frame.loc[frame["task"] == task, "metric"].iloc[0])
    return family(first) if "@" in first else first


def select(agg: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Aggregate rows of `metric` (exact, or one metric of the family per dataset: the first by name)."""
    exact = agg[agg["metric"] == metric]
    if len(exact) or "@" in metric:
        return exact
    fam = agg[agg["metric"].map(lambda m: "@" in m and family(m) == metric)]
    if fam.empty:
        return fam
    first = fam.groupby("dataset_label")["metric"].min()
    return fam[fam["metric"] == fam["dataset_label"].map(first)]


def matrix(rows: pd.DataFrame, value: str = "mean") -> pd.DataFrame:
    """datasets x methods of seed means."""
    return rows.pivot_table(index="dataset_label", columns="method_label", values=value, aggfunc="first")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-")


@dataclass
class Comparison:
    task: str
    backbone: str
    shots: int
    metric: str
    direction: str
    means: pd.DataFrame  # datasets x methods
    metrics_used: dict[str, str]  # dataset -> exact metric
    versus: dict[str, Any]
    friedman: dict[str, Any]

    @property
    def key(self) -> str:
        return slug(f"{self.task}_{self.metric}_{self.backbone}_k{self.shots}")

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task, "backbone": self.backbone, "shots": self.shots, "metric": self.metric,
            "direction": self.direction, "unit": "per-dataset mean over seeds",
            "metric_per_dataset": self.metrics_used,
            "means": {str(d): {str(m): (None if math.isnan(v) else float(v)) for m, v in row.items()}
                      for d, row in self.means.iterrows()},
            "versus_control": self.versus, "friedman_nemenyi": self.friedman,
        }  # fmt: skip


@dataclass
class Report:
    tables: list[Table] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    aggregates: pd.DataFrame | None = None
    metrics: dict[str, str] = field(default_factory=dict)  # task -> metric used


def _direction(rows: pd.DataFrame, what: str) -> str:
    dirs = set(rows["direction"])
    if len(dirs) != 1 or not dirs <= {"higher", "lower"}:
        raise UsageError(
            f"{what}: records disagree on the metric's direction ({sorted(dirs)}); fix the records"
        )
    return dirs.pop()


def compare(
    agg: pd.DataFrame, task: str, backbone: str, shots: int, metric: str, control: str | None
) -> Comparison:
    rows = select(
        agg[(agg["task"] == task) & (agg["backbone"] == backbone) & (agg["shots"] == shots)], metric
    )
    direction = _direction(rows, f"{task} {metric}")
    means = matrix(rows)
    ctrl = control if control in means.columns else stats.best_method(means, direction)
    versus = stats.versus_control(means, ctrl, direction)
    versus["control_chosen"] = (
        "given"
        if control == ctrl
        else ("best average" if control is None else f"best average ({control!r} has no runs here)")
    )
    used = rows.groupby("dataset_label")["metric"].first().to_dict()
    return Comparison(
        task,
        backbone,
        shots,
        metric,
        direction,
        means,
        used,
        versus,
        stats.friedman_nemenyi(means, direction),
    )


def _decimals(values: pd.Series) -> int:
    v = values.dropna().abs()
    return 3 if len(v) and v.max() <= 1.0 else 2


def _seed_notes(rows: pd.DataFrame) -> list[str]:
    if rows.empty:
        return []
    top = int(rows["n"].max())
    few = rows[rows["n"] < top]
    if few.empty:
        return []
    items = ", ".join(f"{r.method_label} on {r.dataset_label} (n={r.n})" for r in few.itertuples())
    return [f"Fewer than {top} seeds: {items}."]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _test_note(c: Comparison, decimals: int = 2) -> str:
    n = len(c.means.index)
    mixed = len(set(c.metrics_used.values())) > 1
    if mixed:
        return (
            _test_note_core(c, n, decimals)
            + f" Each dataset counts with its own {metric_name(c.metric)} metric (header); "
            "the average mixes them and is only a summary across datasets."
        )
    return _test_note_core(c, n, decimals)


def _interval_note(c: Comparison, decimals: int) -> str:
    """The paired difference to the control, with its 95% t-interval over datasets, per method."""
    parts = []
    for m, r in sorted(c.versus["methods"].items()):
        if r["mean_difference"] is None:
            continue
        ci = (f" [{r['ci_low']:.{decimals}f}, {r['ci_high']:.{decimals}f}]" if r["ci_low"] is not None
              else " (one dataset: no interval)")  # fmt: skip
        parts.append(f"{m} {r['mean_difference']:+.{decimals}f}{ci}")
    return "; ".join(parts)


def _test_note_core(c: Comparison, n: int, decimals: int = 2) -> str:
    if len(c.means.columns) < 2:
        return "One method only: nothing to compare."
    if n < stats.MIN_PAIRS:
        return (
            f"No † is possible here: {_plural(n, 'dataset')}, and a Wilcoxon signed-rank test needs at least "
            f"{stats.MIN_PAIRS} to reach p < 0.05. Instead, the mean paired difference to "
            f"{c.versus['control']} over datasets with its 95% t-interval: {_interval_note(c, decimals)}."
        )
    return (
        f"† significantly worse than {c.versus['control']} ({c.versus['control_chosen']}): "
        f"two-sided Wilcoxon signed-rank test over {n} per-dataset seed means, Holm-corrected, "
        f"alpha = {c.versus['alpha']}."
    )


def datasets_table(agg: pd.DataFrame, c: Comparison) -> Table:
    """methods x datasets (mean ± std over seeds) with an average column (dagger vs the control)."""
    rows = select(
        agg[(agg["task"] == c.task) & (agg["backbone"] == c.backbone) & (agg["shots"] == c.shots)], c.metric
    )
    datasets = sorted(rows["dataset_label"].unique())
    methods = sorted(rows["method_label"].unique())
    grouped = c.metric not in c.metrics_used.values()  # a family: name each dataset's own metric
    cols = [
        Column(d, group=metric_name(c.metrics_used[d]) if grouped else "", direction=c.direction)
        for d in datasets
    ] + [Column("Avg.", direction=c.direction, is_average=True)]
    cells: dict[tuple[str, int], Cell] = {}
    for r in rows.itertuples():
        cells[(r.method_label, datasets.index(r.dataset_label))] = Cell(r.mean, r.std, r.n)
    avg = stats.averages(c.means)
    for m in methods:
        res = c.versus["methods"].get(m, {})
        cells[(m, len(datasets))] = Cell(float(avg.get(m, np.nan)), None, 0, dagger=bool(res.get("worse")))
    name = metric_name(c.metric)
    what = "per dataset and held-out domain" if (rows["task_options"] != "{}").any() else "per dataset"
    return Table(
        name=f"{c.key}_datasets",
        caption=f"{c.task}, {name}, {c.backbone}, {c.shots}-shot: mean ± std over seeds {what}; "
        "Avg. over datasets.",
        columns=cols,
        rows=methods,
        cells=cells,
        decimals=_decimals(rows["mean"]),
        notes=["Best in bold, second underlined.", _test_note(c, _decimals(rows["mean"]))]
        + _seed_notes(rows)
        + (["– in Avg.: the method misses a dataset."] if avg.isna().any() else []),
    )


def shots_table(comparisons: list[Comparison]) -> Table:
    """methods x shots, each cell the average over datasets of the seed means (dagger per shot count)."""
    c0 = comparisons[0]
    methods = sorted({m for c in comparisons for m in c.means.columns})
    cols, cells, notes = [], {}, []
    for j, c in enumerate(sorted(comparisons, key=lambda c: c.shots)):
        cols.append(Column(f"{c.shots}-shot", direction=c.direction, is_average=True))
        avg = stats.averages(c.means)
        for m in methods:
            res = c.versus["methods"].get(m, {})
            cells[(m, j)] = Cell(float(avg.get(m, np.nan)), None, 0, dagger=bool(res.get("worse")))
        notes.append(
            f"{c.shots}-shot: {_plural(len(c.means.index), 'dataset')}, control {c.versus['control']}."
        )
    values = pd.Series([x.mean for x in cells.values()], dtype=float)
    return Table(
        name=slug(f"{c0.task}_{c0.metric}_{c0.backbone}") + "_shots",
        caption=f"{c0.task}, {metric_name(c0.metric)}, {c0.backbone}: "
        "average over datasets of the seed means, by shots.",
        columns=cols,
        rows=methods,
        cells=cells,
        decimals=_decimals(values),
        notes=[
            "Best in bold, second underlined. – : the method misses a dataset at that shot count. "
            "† significantly worse than the control by the across-dataset Wilcoxon test, Holm-corrected."
        ]
        + notes,
    )


def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def efficiency_table(frame: pd.DataFrame, task: str, backbone: str) -> Table:
    """Trainable parameters, train time, peak memory, eval images/s, and the device of each measurement."""
    runs = frame[(frame["task"] == task) & (frame["backbone"] == backbone)].drop_duplicates("config_hash")
    cols = [
        Column("Runs"),
        Column("Trainable"),
        Column("Train s"),
        Column("Peak MiB"),
        Column("Eval img/s"),
        Column("Device"),
    ]
    rows, cells = [], {}
    all_kinds = sorted(set(runs["peak_memory_kind"].dropna()))
    for (m, dev), g in runs.groupby(["method_label", "device"], sort=True, dropna=False):
        label = m if runs.loc[runs["method_label"] == m, "device"].nunique() < 2 else f"{m} ({dev})"
        rows.append(label)
        kinds = ",".join(sorted(set(g["peak_memory_kind"].dropna())))
        values = [
            str(len(g)),
            f"{int(g['trainable'].median()):,}" if g["trainable"].notna().any() else "–",
            f"{g['train_s'].mean():.1f}" if g["train_s"].notna().any() else "–",
            _mib(g["peak_memory_bytes"].mean()) + (f" ({kinds})" if kinds and len(all_kinds) > 1 else "")
            if g["peak_memory_bytes"].notna().any()
            else "–",
            f"{g['eval_images_per_s'].mean():.1f}" if g["eval_images_per_s"].notna().any() else "–",
            str(dev),
        ]
        for j, v in enumerate(values):
            cells[(label, j)] = Cell(text=v)
    return Table(
        name=slug(f"{task}_{backbone}") + "_efficiency",
        caption=f"{task}, {backbone}: cost per run "
        "(trainable parameters: median; times and memory: mean over runs).",
        columns=cols,
        rows=rows,
        cells=cells,
        notes=([f"Peak memory: {all_kinds[0]}."] if len(all_kinds) == 1 else [])
        + [
            "Ratios between rows are indicative only: runs may come from different machines (Device column). "
            "A side-by-side ratio comes from a benchmark run in one process, not from the store."
        ],
    )


def build(frame: pd.DataFrame, metric: str | None = None, control: str | None = None) -> Report:
    """Every table and comparison of a report; raises UsageError on an unknown metric or control."""
    choices = metric_choices(frame)
    if metric is not None and metric not in choices:
        raise UsageError(f"--metric {metric!r} is not in these records; choices: {', '.join(choices)}")
    methods = sorted(frame["method_label"].unique())
    if control is not None and control not in methods:
        raise UsageError(f"--control {control!r} has no ok runs; choices: {', '.join(methods)}")
    agg = aggregate(frame)
    report = Report(aggregates=agg)
    for task in sorted(frame["task"].unique()):
        sub = frame[frame["task"] == task]
        m = metric if metric is not None and metric in metric_choices(sub) else default_metric(frame, task)
        report.metrics[task] = m
        # tasks with several metrics per dataset (UCDR: mAP@K and Prec@K) get one table per metric family
        multi = sub.groupby("dataset_label")["metric"].nunique().max() > 1
        selectors = [m] + (sorted({family(x) for x in sub["metric"]} - {family(m)}) if multi else [])
        for backbone in sorted(sub["backbone"].unique()):
            shots = sorted(sub.loc[sub["backbone"] == backbone, "shots"].unique())
            for sel in selectors:
                comps = [compare(agg, task, backbone, int(k), sel, control) for k in shots]
                comps = [c for c in comps if not c.means.empty]
                report.comparisons += comps
                report.tables += [datasets_table(agg, c) for c in comps]
                if sel == m and len(comps) > 1:
                    report.tables.append(shots_table(comps))
            report.tables.append(efficiency_table(sub, task, backbone))
    return report
