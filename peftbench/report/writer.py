"""Write a whole report: tables (LaTeX, Markdown), statistics and aggregates (JSON/CSV), figures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftbench.errors import UsageError
from peftbench.report import plots
from peftbench.report.build import build
from peftbench.report.loading import load

FORMATS = ("latex", "md", "png", "pdf")


def parse_formats(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in FORMATS]
    if not items or bad:
        raise UsageError(f"--format {value!r}: expected a comma-separated list of {', '.join(FORMATS)}")
    return items


@dataclass
class Written:
    files: list[Path] = field(default_factory=list)
    n_records: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)


def write_report(
    results_dir: str | Path,
    out: str | Path,
    formats: list[str] | tuple[str, ...] = FORMATS,
    metric: str | None = None,
    control: str | None = None,
) -> Written:
    """Read the store at `results_dir` and write every table, test and figure under `out`.

    Raises UsageError (the CLI's exit code 2) for an empty store, an unknown metric or control.
    """
    frame = load(results_dir, quiet=True)
    info = Written(
        failed=frame.attrs["failed"], skipped=frame.attrs["skipped"], refused=frame.attrs["refused"]
    )
    if frame.empty:
        extra = [
            f"{len(x)} {what}"
            for x, what in (
                (info.failed, "failed"),
                (info.skipped, "unreadable or partial"),
                (info.refused, "of another schema version"),
            )
            if x
        ]
        raise UsageError(
            f"no finished (status ok) runs in {results_dir}"
            + (f" ({', '.join(extra)} record(s))" if extra else "")
            + f"; produce runs with `peftbench run --method zeroshot --results-dir {results_dir}` first"
        )
    report = build(frame, metric=metric, control=control)
    info.metrics = report.metrics
    info.n_records = int(frame["config_hash"].nunique())
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)

    def put(path: Path, text: str) -> None:
        path.write_text(text)
        info.files.append(path)

    for t in report.tables:
        if "latex" in formats:
            put(out / "tables" / f"{t.name}.tex", t.to_latex())
        if "md" in formats:
            put(out / "tables" / f"{t.name}.md", t.to_markdown())
    if "md" in formats:
        put(out / "report.md", "\n".join(t.to_markdown() for t in report.tables))
    summary = {
        "results_dir": str(results_dir), "records": info.n_records, "metrics": report.metrics,
        "comparisons": [c.to_json() for c in report.comparisons],
        "failed": info.failed, "skipped": info.skipped, "refused": info.refused,
    }  # fmt: skip
    put(out / "stats.json", json.dumps(summary, indent=1, default=str) + "\n")
    agg = report.aggregates.copy()
    agg["seeds"] = agg["seeds"].map(lambda s: " ".join(map(str, s)))
    put(out / "aggregates.csv", agg.to_csv(index=False))
    exts = [f for f in formats if f in ("png", "pdf")]
    if exts:
        (out / "figures").mkdir(exist_ok=True)
        groups: dict[tuple[str, str], list] = {}
        for c in report.comparisons:
            groups.setdefault((c.task, c.backbone), []).append(c)
            info.files += plots.cd_diagram(c, out / "figures", exts)
        for comps in groups.values():
            info.files += plots.shots_curves(report.aggregates, comps, out / "figures", exts)
    return info
