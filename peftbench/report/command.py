"""The `peftbench report` subcommand (registered by one import line at the bottom of peftbench/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftbench.cli import command, err, out


@command("report")
def report(
    results_dir: Annotated[Path, typer.Option(help="The results store to read.")] = Path("results"),
    out_dir: Annotated[Path, typer.Option("--out", help="Where tables, stats and figures go.")] = Path(
        "reports"
    ),
    format_: Annotated[
        str, typer.Option("--format", help="Comma-separated: latex, md, png, pdf.")
    ] = "latex,md,png,pdf",
    metric: Annotated[
        str | None,
        typer.Option(help="Metric or family (acc, map@200, map); default: each task's first metric."),
    ] = None,
    control: Annotated[
        str | None, typer.Option(help="Method row tested against (e.g. mail_pp); default: best on average.")
    ] = None,
) -> None:
    """Aggregate the store over seeds, test across datasets, and write LaTeX/Markdown tables and figures."""
    from peftbench.report.writer import parse_formats, write_report

    info = write_report(results_dir, out_dir, parse_formats(format_), metric=metric, control=control)
    if info.skipped:
        err.print(
            f"warning: skipped {len(info.skipped)} unreadable or partial record(s), e.g. {info.skipped[0]}",
            highlight=False,
            soft_wrap=True,
        )
    if info.refused:
        err.print(
            f"warning: refused {len(info.refused)} record(s) of another schema version, "
            f"e.g. {info.refused[0]}",
            highlight=False,
            soft_wrap=True,
        )
    if info.failed:
        shown = ", ".join(
            f"{f['method']}/{f['dataset']}/{f['shots']}-shot/seed {f['seed']}" for f in info.failed[:5]
        )
        more = f" and {len(info.failed) - 5} more" if len(info.failed) > 5 else ""
        err.print(
            f"warning: {len(info.failed)} failed cell(s) not aggregated: {shown}{more} (see stats.json)",
            highlight=False,
            soft_wrap=True,
        )
    metrics = ", ".join(f"{t}: {m}" for t, m in info.metrics.items())
    out.print(
        f"{info.n_records} run(s) ({metrics}) -> {len(info.files)} file(s) in {out_dir}", highlight=False
    )
