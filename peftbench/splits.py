"""`peftbench splits write|check`: the few-shot split files, without training anything.

    peftbench splits write --dataset dtd --shots 1,2,4,8,16 --seeds 1,2,3 --data-root $DATA
    peftbench splits check --dataset dtd --shots 1,2,4,8,16 --seeds 1,2,3 --data-root $DATA

Both go through the task's own `build` (the code path a run takes), so the files written are the
files a run writes and then reuses, byte for byte:

- `write` builds every (shots, seed) cell against the split directory: a missing file is
  written; an existing one is checked against the draw (a run refuses a file that disagrees).
- `check` builds every cell into a scratch directory and compares each file it would write with
  the existing one: a missing file, train/val entries that differ from the draw (with counts),
  and paths listed in the file that are missing on disk (with the count and the first few) are
  problems; exit code 1 if there is any.

Works for any task whose `build(dataset, shots, seed, backbone, env)` writes its split files
under `env.split_dir` and uses the backbone only for its image transforms.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from peftbench.cli import PluginOpt, SetOpt, _env, _plugins, command, err, parse_int_list, split_sets
from peftbench.errors import UsageError
from peftbench.task import DataEnv, Task, TaskData

ACTIONS = ("write", "check")
DataRootOpt = Annotated[Path | None, typer.Option(help="Folder holding the datasets (or PEFTBENCH_DATA).")]
SplitDirOpt = Annotated[Path | None, typer.Option(help="Where split files go; default RESULTS_DIR/splits.")]
ResultsDirOpt = Annotated[Path, typer.Option(help="The results store (for the default split dir).")]
StrictOpt = Annotated[bool, typer.Option(help="Error when a class has fewer images than --shots.")]


class _TransformsOnly:
    """Stands in for a backbone: `build` only needs its image transforms to wrap the file lists."""

    train_transform = None
    eval_transform = None

    def make_train_transform(self, crop_scale=None):
        return None


@command("splits")
def splits(
    action: Annotated[str, typer.Argument(help="write | check")],
    dataset: Annotated[str, typer.Option(help="Dataset id (`peftbench list datasets`).")],
    task: Annotated[str, typer.Option(help="Task name.")] = "classification",
    shots: Annotated[str, typer.Option(help="Comma-separated shot counts.")] = "1,2,4,8,16",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "1,2,3",
    data_root: DataRootOpt = None,
    split_dir: SplitDirOpt = None,
    results_dir: ResultsDirOpt = Path("results"),
    set_: SetOpt = None,
    strict_shots: StrictOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    plugin: PluginOpt = None,
) -> None:
    """Write the few-shot split files of DATASET, or check existing ones against the disk."""
    from peftbench.config import build_config
    from peftbench.registry import get_dataset, get_task, unknown

    _plugins(plugin)
    if action not in ACTIONS:
        raise unknown("splits action", action, ACTIONS)
    shot_list = parse_int_list(shots, "--shots")
    seed_list = parse_int_list(seeds, "--seeds")
    method_over, task_over = split_sets(set_ or [])
    if method_over:
        raise UsageError(f"--set here takes task options only (task.key=value); got {', '.join(method_over)}")
    task_cls = get_task(task)
    get_dataset(task, dataset)
    task_obj = task_cls(build_config(task_cls.Options, task_over, what=f"{task} task option"))
    env = _env(data_root, split_dir, results_dir, 0, "cpu", strict_shots, False)

    rows = []
    for k in shot_list:
        for s in seed_list:
            fn = write_cell if action == "write" else check_cell
            rows += fn(task_obj, dataset, k, s, env)
    problems = [r for r in rows if r["problem"]]
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            where = r["file"] or "-"
            text = r["problem"] or f"train={r['n_train']} val={r['n_val']}"
            print(f"shots={r['shots']} seed={r['seed']} {r['status']}: {where} {text}")
            for w in r["warnings"]:
                err.print(f"  warning: {w}", highlight=False, soft_wrap=True)
    cells = len(shot_list) * len(seed_list)
    if problems:
        kinds: dict[str, int] = {}
        for r in problems:
            kinds[r["status"]] = kinds.get(r["status"], 0) + 1
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        err.print(f"{len(problems)} problem(s) in {cells} cell(s) of {task}/{dataset}: {summary}",
                  highlight=False)
        raise typer.Exit(1)
    err.print(f"{cells} cell(s) of {task}/{dataset}: {action} ok under {env.split_dir}", highlight=False)


def _row(
    shots: int, seed: int, status: str, file: Path | str | None, problem: str = "", **kw: Any
) -> dict[str, Any]:
    row = {"shots": shots, "seed": seed, "status": status, "file": str(file) if file else None,
           "problem": problem, "n_train": None, "n_val": None, "warnings": []}
    row.update(kw)
    return row


def _build(task: Task, dataset: str, shots: int, seed: int, env: DataEnv) -> tuple[TaskData, list[str]]:
    """The task's own build (what a run does before training), with its warnings collected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = task.build(dataset, shots, seed, _TransformsOnly(), env)
    return data, list(dict.fromkeys(str(w.message) for w in caught))


def write_cell(task: Task, dataset: str, shots: int, seed: int, env: DataEnv) -> list[dict[str, Any]]:
    """Write the cell's split file(s) through `task.build`, or check an existing one agrees."""
    before = set(_json_files(env.split_dir / task.name / dataset))
    try:
        data, warns = _build(task, dataset, shots, seed, env)
    except UsageError as e:
        return [_row(shots, seed, "error", None, str(e))]
    file = data.fingerprint.get("split_file")
    status = "present" if file and Path(file) in before else "written"
    n_train, n_val = _counts(Path(file)) if file else (len(data.train), None)
    return [_row(shots, seed, status, file, n_train=n_train, n_val=n_val, warnings=warns)]


def check_cell(task: Task, dataset: str, shots: int, seed: int, env: DataEnv) -> list[dict[str, Any]]:
    """Draw the cell into a scratch directory and compare with the existing file(s)."""
    with tempfile.TemporaryDirectory(prefix="peftbench-splits-") as tmp:
        scratch = Path(tmp)
        try:
            data, warns = _build(task, dataset, shots, seed, replace(env, split_dir=scratch))
        except UsageError as e:
            return [_row(shots, seed, "error", None, str(e))]
        roots = {getattr(part, "root", None) for part in (data.train, data.val) if part is not None}
        root = next(iter(roots)) if len(roots) == 1 else None
        rows = []
        for fresh_path in _json_files(scratch):
            target = env.split_dir / fresh_path.relative_to(scratch)
            row = _row(shots, seed, "ok", target, warnings=warns)
            rows.append(row)
            if not target.is_file():
                row.update(status="missing", problem="no split file (`peftbench splits write` writes it)")
                continue
            fresh = json.loads(fresh_path.read_text())
            try:
                existing = json.loads(target.read_text())
            except (OSError, json.JSONDecodeError) as e:
                row.update(status="unreadable", problem=f"cannot read the split file: {e}")
                continue
            if not isinstance(existing, dict):
                row.update(status="unreadable", problem="the split file is not a JSON object")
                continue
            row.update(n_train=len(existing.get("train") or []), n_val=len(existing.get("val") or []))
            problems = []
            for part in ("train", "val"):
                diff = _diff(existing.get(part) or [], fresh.get(part) or [])
                if diff:
                    problems.append(f"{part}: {diff}")
            if problems:
                row.update(status="differs", problem="differs from the draw on disk: " + "; ".join(problems))
            if root is not None:
                listed = [it[0] for part in ("train", "val") for it in existing.get(part) or []]
                missing = [p for p in listed if not (Path(root) / p).is_file()]
                if missing:
                    msg = (f"{len(missing)} listed file(s) missing under {root}, "
                           f"e.g. {', '.join(missing[:3])}")
                    row.update(status="missing-files" if not problems else row["status"],
                               problem="; ".join(filter(None, [row["problem"], msg])))
        no_file = f"task {task.name!r} wrote no split file for this cell"
        return rows or [_row(shots, seed, "error", None, no_file)]


def _diff(existing: list, fresh: list) -> str:
    """'N only in the file, M only in the draw' (order-insensitive), or '' when they agree."""
    a = {json.dumps(it) for it in existing}
    b = {json.dumps(it) for it in fresh}
    if a == b and len(existing) == len(fresh):
        return "" if existing == fresh else "same entries in a different order"
    return f"{len(a - b)} entr(y/ies) only in the file, {len(b - a)} only in the draw"


def _counts(path: Path) -> tuple[int, int]:
    """Entries in a split file's train and val lists (what `check` reports too)."""
    split = json.loads(path.read_text())
    return len(split.get("train") or []), len(split.get("val") or [])


def _json_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.json")) if folder.is_dir() else []
