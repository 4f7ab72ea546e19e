"""Figures (matplotlib, Agg backend): metric against shots, and critical-difference diagrams.

Every figure is written in each asked-for format (PNG and PDF by default).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import scikit_posthocs as sp  # noqa: E402

from peftbench.report import stats  # noqa: E402
from peftbench.report.build import Comparison, select, slug  # noqa: E402
from peftbench.report.tables import metric_name  # noqa: E402


def _save(fig, out: Path, stem: str, exts: list[str]) -> list[Path]:
    paths = [out / f"{stem}.{ext}" for ext in exts]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=150 if p.suffix == ".png" else None)
    plt.close(fig)
    return paths


def shots_curves(agg: pd.DataFrame, comparisons: list[Comparison], out: Path, exts: list[str]) -> list[Path]:
    """Metric against shots: one panel per dataset (mean and 95% t-interval over seeds) and the average."""
    c0 = comparisons[0]
    rows = select(agg[(agg["task"] == c0.task) & (agg["backbone"] == c0.backbone)], c0.metric)
    datasets = sorted(rows["dataset_label"].unique())
    methods = sorted(rows["method_label"].unique())
    panels = datasets + ["average"]
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for m in methods:
            if panel == "average":
                pts = [(c.shots, float(stats.averages(c.means).get(m, float("nan")))) for c in comparisons]
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker="o", label=m)
                continue
            g = rows[(rows["dataset_label"] == panel) & (rows["method_label"] == m)].sort_values("shots")
            if g.empty:
                continue
            err = (g["mean"] - g["ci_low"]).fillna(0.0)
            ax.errorbar(g["shots"], g["mean"], yerr=err, marker="o", capsize=2, label=m)
        ax.set_title(panel, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(rows["shots"].unique()), [str(k) for k in sorted(rows["shots"].unique())])
        ax.set_xlabel("shots", fontsize=8)
        ax.set_ylabel(metric_name(c0.metric), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.02)
    )
    fig.suptitle(f"{c0.task}, {c0.backbone}: mean and 95% t-interval over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, out, slug(f"{c0.task}_{c0.metric}_{c0.backbone}") + "_shots", exts)


def cd_diagram(c: Comparison, out: Path, exts: list[str]) -> list[Path]:
    """Critical-difference diagram (scikit_posthocs) from average ranks and Nemenyi p-values."""
    fr = c.friedman
    if (
        "skipped" in fr
        or fr["friedman"]["p"] is None
        or any(p is None for row in fr["nemenyi_p"].values() for p in row.values())
    ):
        return []
    ranks = pd.Series(fr["average_ranks"])
    sig = pd.DataFrame(fr["nemenyi_p"]).loc[ranks.index, ranks.index]
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.35 * len(ranks)))
    sp.critical_difference_diagram(ranks, sig, ax=ax, alpha=fr["alpha"])
    ax.set_title(
        f"{c.task}, {metric_name(c.metric)}, {c.shots}-shot: average rank over {len(fr['datasets'])} "
        f"datasets (Friedman p={fr['friedman']['p']:.3g}; CD={fr['critical_difference']:.2f})",
        fontsize=8,
    )
    return _save(fig, out, f"{c.key}_cd", exts)
