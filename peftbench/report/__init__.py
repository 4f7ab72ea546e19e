"""`peftbench report`: records -> seed aggregates -> across-dataset tests -> tables and figures.

    from peftbench.report import load, aggregate, build_report, write_report
    frame = load("results/")            # one row per (ok record, metric); see peftbench.report.loading
    agg = aggregate(frame)              # mean, std (ddof=1), n, 95% t-interval per group
    write_report("results/", "reports/", metric="acc", control="mail_pp")

Names are imported lazily so that registering the CLI subcommand stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "load": ("peftbench.report.loading", "load"),
    "aggregate": ("peftbench.report.aggregation", "aggregate"),
    "build_report": ("peftbench.report.build", "build"),
    "write_report": ("peftbench.report.writer", "write_report"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'peftbench.report' has no attribute {name!r}")
