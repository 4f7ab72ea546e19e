"""The `peftbench` command line (typer).

    peftbench run --method mail_pp --task ucdr --shots 1,2,4 --seeds 1,2,3
    peftbench list methods|tasks|datasets|backbones [--json]
    peftbench show [RESULTS_DIR] [--json]
    peftbench params --method lora --backbone ViT-B-16 [--set r=4] [--json]

Bad input gets one line on stderr and exit code 2; nothing is written.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from peftbench.errors import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compare parameter-efficient fine-tuning methods for CLIP on one frozen backbone.",
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

KINDS = ("methods", "tasks", "datasets", "backbones")


def parse_int_list(value: str, option: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; anything else is a one-line error naming the option."""
    try:
        items = [int(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        items = []
    if not items or any(i < 0 for i in items) or (option == "--shots" and any(i < 1 for i in items)):
        raise UsageError(f"{option} expects comma-separated positive integers such as 1,2,4; got {value!r}")
    return list(dict.fromkeys(items))


def split_sets(pairs: list[str]) -> tuple[dict, dict]:
    """--set key=value (method config) and --set task.key=value (task options)."""
    from peftbench.config import parse_overrides

    parsed = parse_overrides(pairs)
    method = {k: v for k, v in parsed.items() if not k.startswith("task.")}
    task = {k[len("task.") :]: v for k, v in parsed.items() if k.startswith("task.")}
    return method, task


def _plugins(plugin: list[Path] | None) -> None:
    from peftbench.registry import load_plugins

    load_plugins(plugin or [])


def _env(data_root, split_dir, results_dir, workers, device, strict_shots=False, skip_corrupt=False):
    from peftbench.task import DataEnv
    from peftbench.trainer import pick_device

    root = data_root or os.environ.get("PEFTBENCH_DATA")
    try:
        dev = pick_device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device!r} is not a valid torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return DataEnv(
        data_root=Path(root) if root else None,
        split_dir=Path(split_dir) if split_dir else Path(results_dir) / "splits",
        workers=workers,
        strict_shots=strict_shots,
        skip_corrupt=skip_corrupt,
        device=dev,
    )


def command(name: str | None = None):
    """app.command that turns UsageError into one red line on stderr and exit code 2."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UsageError as e:
                err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None

        return app.command(name)(wrapper)

    return deco


PluginOpt = Annotated[
    list[Path] | None, typer.Option("--plugin", help="A Python file that registers methods or tasks.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a method config field (key=value) or a task option (task.key=value)."
    ),
]


@command()
def run(
    method: Annotated[str, typer.Option(help="Method name (`peftbench list methods`).")] = "zeroshot",
    task: Annotated[str, typer.Option(help="Task name (`peftbench list tasks`).")] = "classification",
    dataset: Annotated[
        str | None, typer.Option(help="Dataset id; default: the task's embedded dataset.")
    ] = None,
    backbone: Annotated[
        str, typer.Option(help="open_clip architecture, shipped backbone, or config JSON.")
    ] = "synth-tiny",
    pretrained: Annotated[
        str, typer.Option(help="open_clip tag, local weights file, 'default' (shipped weights) or 'none'.")
    ] = "default",
    shots: Annotated[str, typer.Option(help="Comma-separated shot counts.")] = "16",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "1",
    set_: SetOpt = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:1, ...")] = "auto",
    results_dir: Annotated[Path, typer.Option(help="The results store.")] = Path("results"),
    data_root: Annotated[
        Path | None, typer.Option(help="Folder holding the datasets (or PEFTBENCH_DATA).")
    ] = None,
    split_dir: Annotated[
        Path | None, typer.Option(help="Where split files go; default RESULTS_DIR/splits.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Data loader worker processes.")] = 0,
    plugin: PluginOpt = None,
    retry_failed: Annotated[bool, typer.Option(help="Rerun cells whose latest record failed.")] = False,
    force: Annotated[bool, typer.Option(help="Rerun every cell, even finished ones.")] = False,
    strict_shots: Annotated[
        bool, typer.Option(help="Error when a class has fewer images than --shots.")
    ] = False,
    skip_corrupt: Annotated[
        bool, typer.Option(help="Skip unreadable images (counted) instead of failing.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars on stderr.")] = True,
) -> None:
    """Run METHOD on TASK for every (shots, seed) cell, skipping cells the store already has."""
    from peftbench.results import ResultStore
    from peftbench.runner import RunSpec, execute, resolve

    _plugins(plugin)
    shot_list = parse_int_list(shots, "--shots")
    seed_list = parse_int_list(seeds, "--seeds")
    method_over, task_over = split_sets(set_ or [])
    env = _env(data_root, split_dir, results_dir, workers, device, strict_shots, skip_corrupt)
    env.progress = progress
    store = ResultStore(results_dir)
    specs = [
        RunSpec(
            method=method,
            task=task,
            dataset=dataset,
            backbone=backbone,
            pretrained=None if pretrained.lower() == "none" else pretrained,
            shots=k,
            seed=s,
            method_overrides=tuple(sorted(method_over.items())),
            task_overrides=tuple(sorted(task_over.items())),
        )
        for k in shot_list
        for s in seed_list
    ]
    for spec in specs:  # validate every cell (names, configs) before running any
        resolve(spec, env.device)
    outcomes = [
        execute(spec, store, env, force=force, retry_failed=retry_failed, progress=progress) for spec in specs
    ]
    _print_outcomes(outcomes)
    counts = Counter(o.status for o in outcomes)
    out.print(
        ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + f" ({len(outcomes)} cells)"
    )
    failed = [o for o in outcomes if o.status in ("failed", "skipped-failed")]
    if failed:
        err.print(
            f"{len(failed)} cell(s) failed; see `peftbench show {results_dir}`; "
            "rerun them with --retry-failed"
        )
        raise typer.Exit(1)


def _primary(record: dict) -> tuple[str, float | None]:
    metrics = record.get("metrics") or {}
    if not metrics:
        return "-", None
    name = next(iter(metrics))
    return name, metrics[name]["value"]


def _print_outcomes(outcomes) -> None:
    table = Table(title="runs")
    for col in ("method", "dataset", "shots", "seed", "status", "metric", "trainable", "train s", "hash"):
        table.add_column(col)
    for o in outcomes:
        rec = o.record or {}
        name, value = _primary(rec)
        table.add_row(
            o.spec.method,
            (rec.get("resolved") or {}).get("task", {}).get("dataset", o.spec.dataset or "-"),
            str(o.spec.shots),
            str(o.spec.seed),
            o.status,
            f"{name} {value:.2f}" if value is not None else (rec.get("error") or "-")[:60],
            f"{rec['params']['trainable']:,}" if rec.get("params") else "-",
            f"{rec['timing']['train_s']:.1f}" if rec.get("timing") else "-",
            o.config_hash[:12],
        )
    out.print(table)


@command("list")
def list_(
    kind: Annotated[str, typer.Argument(help="methods | tasks | datasets | backbones")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    plugin: PluginOpt = None,
) -> None:
    """List registered methods, tasks, datasets or backbones."""
    from peftbench.backbone import list_backbones
    from peftbench.registry import DATASETS, METHODS, TASKS, unknown

    _plugins(plugin)
    if kind not in KINDS:
        raise unknown("list kind", kind, KINDS)
    if kind == "methods":
        rows = [
            {"name": n, "tasks": list(c.tasks), "mergeable": c.mergeable, "summary": _summary(c)}
            for n, c in sorted(METHODS.items())
        ]
    elif kind == "tasks":
        rows = [
            {"name": n, "metrics": c.metrics, "default_dataset": c.default_dataset, "summary": _summary(c)}
            for n, c in sorted(TASKS.items())
        ]
    elif kind == "datasets":
        rows = [
            {"task": t, "name": n, "summary": _summary(c)}
            for t, ds in sorted(DATASETS.items())
            for n, c in sorted(ds.items())
        ]
    else:
        rows = [{"name": n} for n in list_backbones()]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=kind)
    for col in rows[0] if rows else ["name"]:
        table.add_column(col)
    for r in rows:
        table.add_row(*(", ".join(v) if isinstance(v, list) else str(v) for v in r.values()))
    out.print(table)


def _summary(cls) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


@command()
def show(
    results_dir: Annotated[Path, typer.Argument(help="The results store.")] = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    all_records: Annotated[
        bool, typer.Option("--all", help="Every record, not just each cell's latest.")
    ] = False,
) -> None:
    """Show the records of a results store as a table (each cell's latest record)."""
    from peftbench.results import ResultStore, strip_private

    store = ResultStore(results_dir)
    with warnings.catch_warnings(record=True):
        recs = store.records() if all_records else list(store.latest_by_cell().values())
    if store.skipped:
        err.print(f"warning: skipped {len(store.skipped)} unreadable record(s)")
    recs.sort(
        key=lambda r: (
            r["spec"]["method"],
            r["resolved"]["task"]["dataset"],
            r["spec"]["shots"],
            r["spec"]["seed"],
        )
    )
    if as_json:
        print(json.dumps([strip_private(r) for r in recs], indent=1, default=str))
        return
    if not recs:
        err.print(f"no records in {results_dir}; produce some with `peftbench run --method zeroshot`")
        return
    table = Table(title=f"{len(recs)} record(s) in {results_dir}")
    for col in (
        "hash",
        "method",
        "task",
        "dataset",
        "backbone",
        "shots",
        "seed",
        "status",
        "metric",
        "trainable",
        "train s",
        "merged",
    ):
        table.add_column(col)
    for r in recs:
        name, value = _primary(r)
        table.add_row(
            r["config_hash"][:12],
            r["spec"]["method"],
            r["spec"]["task"],
            r["resolved"]["task"]["dataset"],
            r["spec"]["backbone"],
            str(r["spec"]["shots"]),
            str(r["spec"]["seed"]),
            r["status"],
            f"{name} {value:.2f}" if value is not None else (r.get("error") or "-")[:50],
            f"{r['params']['trainable']:,}" if r.get("params") else "-",
            f"{r['timing']['train_s']:.1f}" if r.get("timing") else "-",
            str(r.get("merged", False)),
        )
    out.print(table)


@command()
def params(
    method: Annotated[str, typer.Option(help="Method name.")],
    backbone: Annotated[str, typer.Option(help="open_clip architecture or shipped backbone.")] = "synth-tiny",
    task: Annotated[str, typer.Option(help="Task (defaults may depend on it).")] = "classification",
    dataset: Annotated[str | None, typer.Option(help="Dataset (defaults may depend on it).")] = None,
    shots: Annotated[int, typer.Option(help="Shots (defaults may depend on them).")] = 16,
    classes: Annotated[int, typer.Option(help="Number of classes to build the head for.")] = 10,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    plugin: PluginOpt = None,
) -> None:
    """Build METHOD on BACKBONE without weights or training and print its parameter counts."""
    from peftbench.runner import RunSpec, build_method, resolve

    _plugins(plugin)
    method_over, task_over = split_sets(set_ or [])
    spec = RunSpec(
        method=method,
        task=task,
        dataset=dataset,
        backbone=backbone,
        pretrained=None,
        shots=shots,
        method_overrides=tuple(sorted(method_over.items())),
        task_overrides=tuple(sorted(task_over.items())),
    )
    run_ = resolve(spec, torch.device("cpu"), check_dataset=False)
    model = build_method(run_, [f"class {i}" for i in range(classes)], "a photo of a {}.")
    trainable = model.num_trainable()
    total = sum(p.numel() for p in model.parameters())
    result = {
        "method": method,
        "backbone": backbone,
        "trainable": trainable,
        "total": total,
        "trainable_percent": 100.0 * trainable / total,
        "config": run_.resolved["method"]["config"],
    }
    if as_json:
        print(json.dumps(result, indent=1))
        return
    out.print(
        f"{method} on {backbone}: {trainable:,} trainable of {total:,} parameters "
        f"({result['trainable_percent']:.3f}%)"
    )


# Subcommands defined in their own modules register on `app` when imported here.
from peftbench import (  # noqa: E402
    export,  # noqa: E402,F401
    splits,  # noqa: E402,F401
    sweep,  # noqa: E402,F401
)
from peftbench.report import command as _report_command  # noqa: E402,F401


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
