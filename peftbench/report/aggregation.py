"""Seed aggregates: mean, std (ddof=1), n and a t-based 95% confidence interval per group.

A group is everything that makes runs different (see `GROUP`): task, dataset and task options,
backbone, shots, method and its non-default config, metric. Seeds are the only thing averaged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

GROUP = ["task", "dataset", "task_options", "dataset_label", "backbone", "shots", "method_label", "metric"]
LEVEL = 0.95  # the confidence level of every interval in a report


def t_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float, float, float]:
    """(mean, std ddof=1, low, high) of a t-based interval; std and bounds are NaN when n < 2."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / np.sqrt(n)
    return mean, std, mean - half, mean + half


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per group with mean, std, n, ci_low, ci_high, direction and the seeds used."""
    rows = []
    for key, g in frame.groupby(GROUP, sort=True):
        mean, std, low, high = t_interval(g["value"].to_numpy())
        directions = g["direction"].unique()
        rows.append({
            **dict(zip(GROUP, key, strict=True)),
            "method": g["method"].iloc[0],
            "direction": directions[0] if len(directions) == 1 else "mixed",
            "mean": mean, "std": std, "n": len(g), "ci_low": low, "ci_high": high,
            "seeds": sorted(int(s) for s in g["seed"]),
        })  # fmt: skip
    return pd.DataFrame(rows)
