"""Across-dataset statistics on per-dataset seed means, with maintained libraries only.

- Each method against a control: paired two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon)
  over the datasets both ran, Holm-corrected over the methods tested
  (statsmodels.stats.multitest.multipletests(method="holm")). With fewer than `MIN_PAIRS` paired
  datasets no Wilcoxon test can reach p < 0.05 (the smallest two-sided exact p with n pairs is
  2 / 2**n: 0.0625 for 5), so no pairwise claim is made there: the t-interval of the paired
  difference is reported instead, with that reason.
- Friedman (scipy.stats.friedmanchisquare) with the Nemenyi post-hoc test
  (scikit_posthocs.posthoc_nemenyi_friedman) and average ranks for a critical-difference diagram,
  when at least 3 methods ran on every one of at least 5 datasets (Demsar, JMLR 2006).
- There are no seed-level tests: a Wilcoxon test over 3 seeds can never reach p < 0.05.
Everything returned is plain JSON-serialisable data.
"""

from __future__ import annotations

import gc
import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scikit_posthocs as sp
from scipy import stats
from statsmodels.stats.multitest import multipletests

from peftbench.report.aggregation import LEVEL, t_interval

ALPHA = 0.05
MIN_PAIRS = 6  # smallest n whose exact two-sided Wilcoxon p (2 / 2**n) is below 0.05
MIN_FRIEDMAN_METHODS = 3
MIN_FRIEDMAN_DATASETS = 5
NO_CLAIM = (
    "fewer than 6 paired datasets: a two-sided Wilcoxon signed-rank test cannot reach p < 0.05 "
    "(its smallest p with n pairs is 2/2^n), so no pairwise claim is made; the t-interval of the "
    "paired difference is shown instead"
)


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def sign(direction: str) -> float:
    """+1 when higher is better, -1 when lower is better."""
    if direction not in ("higher", "lower"):
        raise ValueError(f"metric direction must be 'higher' or 'lower', got {direction!r}")
    return 1.0 if direction == "higher" else -1.0


def averages(means: pd.DataFrame) -> pd.Series:
    """Average over datasets for each method (column); NaN where a method misses a dataset."""
    return means.mean(axis=0, skipna=False)


def best_method(means: pd.DataFrame, direction: str) -> str:
    """The method with the best average over the datasets it shares with all others."""
    avg = averages(means).dropna()
    if avg.empty:  # nobody ran every dataset: compare on the common ones
        avg = means.dropna(axis=0).mean(axis=0).dropna()
    if avg.empty:
        avg = means.mean(axis=0)
    return str((avg * sign(direction)).idxmax())


def versus_control(means: pd.DataFrame, control: str, direction: str, alpha: float = ALPHA) -> dict[str, Any]:
    """Every method (column of `means`, index = datasets) against `control`; see the module doc."""
    s = sign(direction)
    results: dict[str, dict[str, Any]] = {}
    tested, pvals = [], []
    for m in means.columns:
        if m == control:
            continue
        pair = means[[m, control]].dropna()
        diff = (pair[m] - pair[control]).to_numpy()  # (n_datasets,) method minus control
        mean, std, low, high = t_interval(diff)
        r: dict[str, Any] = {
            "n_pairs": len(diff), "datasets": [str(d) for d in pair.index],
            "mean_difference": _num(mean), "std_difference": _num(std),
            "ci_low": _num(low), "ci_high": _num(high), "ci_level": LEVEL,
            "test": None, "statistic": None, "p": None, "p_holm": None, "worse": False, "better": False,
        }  # fmt: skip
        if len(diff) < MIN_PAIRS:
            r["reason"] = NO_CLAIM
        elif np.all(diff == 0):
            r.update(test="wilcoxon", p=1.0, reason="all paired differences are zero")
        else:
            res = stats.wilcoxon(pair[m].to_numpy(), pair[control].to_numpy(), alternative="two-sided")
            r.update(test="wilcoxon", statistic=float(res.statistic), p=float(res.pvalue))
        if r["p"] is not None:
            tested.append(m)
            pvals.append(r["p"])
        results[str(m)] = r
    if tested:
        # statsmodels' Holm branch calls gc.collect(); freezing the (large, torch-laden) heap first keeps that
        # collection from walking every live object, which took 0.1-0.4 s per call on a busy 2-core machine.
        gc.freeze()
        try:
            reject, p_holm, _, _ = multipletests(pvals, alpha=alpha, method="holm")
        finally:
            gc.unfreeze()
        for m, rej, ph in zip(tested, reject, p_holm, strict=True):
            r = results[str(m)]
            r["p_holm"] = float(ph)
            r["worse"] = bool(rej and s * r["mean_difference"] < 0)
            r["better"] = bool(rej and s * r["mean_difference"] > 0)
    return {
        "control": control,
        "direction": direction,
        "alpha": alpha,
        "correction": "holm",
        "min_pairs": MIN_PAIRS,
        "methods": results,
    }


def average_ranks(means: pd.DataFrame, direction: str) -> pd.Series:
    """Average rank per method over datasets (1 = best, ties get the mean rank)."""
    ranks = (-sign(direction) * means).rank(axis=1, method="average")
    return ranks.mean(axis=0)


def critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi critical difference q_alpha * sqrt(k (k+1) / (6 n)), q from the studentized range."""
    q = float(stats.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    return q * math.sqrt(k * (k + 1) / (6.0 * n))


def friedman_nemenyi(means: pd.DataFrame, direction: str, alpha: float = ALPHA) -> dict[str, Any]:
    """Friedman + Nemenyi over the methods that ran every dataset (rows = datasets, cols = methods)."""
    full = means.dropna(axis=1, how="any")
    dropped = [str(m) for m in means.columns if m not in full.columns]
    k, n = full.shape[1], full.shape[0]
    out: dict[str, Any] = {
        "methods": [str(m) for m in full.columns],
        "datasets": [str(d) for d in full.index],
        "dropped_incomplete_methods": dropped,
        "alpha": alpha,
    }
    if k < MIN_FRIEDMAN_METHODS or n < MIN_FRIEDMAN_DATASETS:
        out["skipped"] = (
            f"Friedman/Nemenyi needs >= {MIN_FRIEDMAN_METHODS} methods on every one of >= "
            f"{MIN_FRIEDMAN_DATASETS} datasets; have {k} method(s) on {n} dataset(s)"
        )
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fr = stats.friedmanchisquare(*(full[c].to_numpy() for c in full.columns))
        nem = sp.posthoc_nemenyi_friedman(full.to_numpy())
    nem.index = nem.columns = [str(c) for c in full.columns]
    ranks = average_ranks(full, direction)
    out.update(
        friedman={"statistic": _num(float(fr.statistic)), "p": _num(float(fr.pvalue))},  # None: all tied
        average_ranks={str(m): float(r) for m, r in ranks.items()},
        nemenyi_p={a: {b: _num(float(nem.loc[a, b])) for b in nem.columns} for a in nem.index},
        critical_difference=critical_difference(k, n, alpha),
    )
    return out
