"""Sweeps: an experiment file -> RunSpecs -> jobs on submitit (local processes or SLURM).

    peftbench sweep experiments/small.yaml --dry-run          the plan: done / failed / to run, time
    peftbench sweep experiments/small.yaml                     run what is missing, in this process
    peftbench sweep experiments/small.yaml --workers 4         on 4 local processes (submitit)
    peftbench sweep experiments/paper.yaml --executor slurm    a SLURM job array (submitit)
    peftbench status experiments/small.yaml                    done / running / failed / pending

The experiment file only selects and overrides (docs/sweeps.md has the schema):

    backbones: [synth-tiny]                 # or {name: ViT-B-16, pretrained: openai}
    methods:
      zeroshot:                             # defaults
      lora: {r: 2}                          # per-method overrides (a list of maps: variants)
    tasks:
      classification: {datasets: [synth]}   # datasets: names or {name, options}
    shots: [1, 4]
    seeds: [1, 2, 3]

Dispatch never uses a home-made scheduler: every job is a submitit `Checkpointable` that runs a
chunk of RunSpecs through `peftbench.runner.execute`, which takes the cell's lock, skips finished
cells and appends one record. A preempted or timed-out job is requeued by submitit with the
RunSpecs it had not finished, and a run cut mid-training resumes from its last epoch checkpoint
(`<results>/checkpoints/<hash>.pt`). Re-running the same command finishes exactly what is missing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import submitit
import torch
import typer
import yaml
from rich.markup import escape
from rich.table import Table

from peftbench.cli import PluginOpt, command, err, out
from peftbench.errors import UsageError
from peftbench.registry import closest

if TYPE_CHECKING:
    from peftbench.results import ResultStore
    from peftbench.runner import RunSpec

EXECUTORS = ("local", "slurm")
TOP_KEYS = (
    "name",
    "description",
    "results_dir",
    "data_root",
    "split_dir",
    "plugins",
    "device",
    "backbones",
    "methods",
    "tasks",
    "shots",
    "seeds",
    "slurm",
)
BACKBONE_KEYS = ("name", "pretrained")
TASK_KEYS = ("datasets", "options")
DATASET_KEYS = ("name", "options")
# SLURM settings of the experiment file -> submitit AutoExecutor parameters (CLI flags override).
SLURM_KEYS = (
    "partition",
    "gpus_per_node",
    "cpus_per_task",
    "mem_gb",
    "timeout_min",
    "array_parallelism",
    "chunk_size",
    "additional_parameters",
    "setup",
    "max_num_timeout",
)


# ------------------------------------------------------------------------------ YAML with lines
class _Map(dict):
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int = 0
    lines: dict[Any, int]


class _Seq(list):
    line: int = 0
    lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences carry the source lines (error messages cite them)."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    m = _Map()
    m.line, m.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in m:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {m.lines[key]})", key_node.start_mark
            )
        m[key] = loader.construct_object(value_node, deep=True)
        m.lines[key] = key_node.start_mark.line + 1
    return m


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    s = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    s.line, s.lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return s


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def _line_of(node: Any, key: Any = None) -> int | None:
    if isinstance(node, _Map) and key is not None and key in node.lines:
        return node.lines[key]
    if isinstance(node, _Seq) and isinstance(key, int) and 0 <= key < len(node.lines):
        return node.lines[key]
    return getattr(node, "line", None) or None


# ------------------------------------------------------------------------------ the experiment
@dataclass
class Experiment:
    """An experiment file, validated and expanded (every cell a RunSpec, deduplicated)."""

    path: Path
    name: str
    specs: list[RunSpec]
    origins: dict[RunSpec, str]  # spec -> "file:line" of the method entry that produced it
    results_dir: Path
    data_root: Path | None
    split_dir: Path | None
    plugins: list[Path]
    device: str
    slurm: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # e.g. method/task pairs left out


class _File:
    """Error helper bound to one experiment file."""

    def __init__(self, path: Path):
        self.path = path

    def where(self, line: int | None) -> str:
        return f"{self.path}:{line}" if line else str(self.path)

    def error(self, line: int | None, message: str) -> UsageError:
        return UsageError(f"{self.where(line)}: {message}")

    def keys(self, node: Any, allowed: Sequence[str], what: str) -> None:
        """Unknown keys -> one error with the line, the closest key and the valid keys."""
        if not isinstance(node, dict):
            raise self.error(_line_of(node), f"{what} must be a mapping, got {type(node).__name__}")
        for key in node:
            if key not in allowed:
                hint = closest(str(key), allowed)
                did = f" (did you mean {hint!r}?)" if hint else ""
                raise self.error(
                    _line_of(node, key),
                    f"unknown key {key!r} in {what}{did}; valid keys: {', '.join(allowed)}",
                )


def load_experiment(path: str | Path, extra_plugins: Sequence[str | Path] = ()) -> Experiment:
    """Read, validate and expand an experiment file; every error names the file and line."""
    from peftbench.registry import get_dataset, get_method, get_task, load_plugins
    from peftbench.runner import RunSpec

    path = Path(path)
    f = _File(path)
    if not path.is_file():
        raise UsageError(f"experiment file not found: {path}")
    try:
        doc = yaml.load(path.read_text(), Loader=_LineLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise f.error(mark.line + 1 if mark else None, f"malformed YAML: {problem}") from None
    if doc is None:
        raise f.error(
            None, "the file is empty; it needs at least `methods:` and `tasks:` (see docs/sweeps.md)"
        )
    f.keys(doc, TOP_KEYS, "the experiment")
    for required in ("methods", "tasks"):
        if required not in doc or not doc[required]:
            raise f.error(
                _line_of(doc, required),
                f"the grid is empty: `{required}:` names nothing (see docs/sweeps.md)",
            )

    base = path.resolve().parent
    plugins = [(base / p).resolve() for p in _str_list(f, doc, "plugins")] + [
        Path(p).resolve() for p in extra_plugins
    ]
    for i, p in enumerate(plugins):
        if not p.is_file():
            raise f.error(
                _line_of(doc.get("plugins"), i) or _line_of(doc, "plugins"), f"plugin file not found: {p}"
            )
    load_plugins(plugins)

    backbones = _backbones(f, doc)
    shots = _ints(f, doc, "shots", [16], minimum=1)
    seeds = _ints(f, doc, "seeds", [1], minimum=0)

    # methods: name -> None | {overrides} | [{overrides}, ...]
    methods_node = doc["methods"]
    if isinstance(methods_node, list):  # also accept a list of names / {name: overrides}
        merged = _Map()
        merged.line, merged.lines = methods_node.line, {}
        for i, item in enumerate(methods_node):
            entries = item.items() if isinstance(item, dict) else [(item, None)]
            for k, v in entries:
                merged.setdefault(k, _Seq())
                merged.lines.setdefault(k, _line_of(methods_node, i))
                merged[k].append(v)
        methods_node = merged
    if not isinstance(methods_node, dict):
        raise f.error(_line_of(doc, "methods"), "methods must map method names to overrides")
    methods: list[tuple[str, dict[str, Any], str]] = []
    for name, variants in methods_node.items():
        line = _line_of(methods_node, name)
        try:
            cls = get_method(str(name))
        except UsageError as e:
            raise f.error(line, str(e)) from None
        for ov in variants if isinstance(variants, list) else [variants]:
            ov = ov or {}
            if not isinstance(ov, dict):
                raise f.error(
                    line, f"overrides of method {name!r} must be a mapping such as {{lr: 0.01}}, got {ov!r}"
                )
            _check_config(f, cls.Config, ov, f"{name} config", line)
            methods.append((str(name), dict(ov), f.where(line)))

    tasks_node = doc["tasks"]
    if not isinstance(tasks_node, dict):
        raise f.error(
            _line_of(doc, "tasks"), "tasks must map task names to {datasets: [...], options: {...}}"
        )
    tasks: list[tuple[str, str, dict[str, Any]]] = []
    for tname, tnode in tasks_node.items():
        line = _line_of(tasks_node, tname)
        try:
            task_cls = get_task(str(tname))
        except UsageError as e:
            raise f.error(line, str(e)) from None
        tnode = tnode if tnode is not None else _Map()
        f.keys(tnode, TASK_KEYS, f"task {tname!r}")
        task_opts = _variants(f, tnode, "options", f"{tname} task options")
        datasets = tnode.get("datasets") or [task_cls.default_dataset]
        if not isinstance(datasets, list):
            datasets = [datasets]
        for i, d in enumerate(datasets):
            dline = _line_of(tnode.get("datasets"), i) or line
            if isinstance(d, dict):
                f.keys(d, DATASET_KEYS, f"a dataset of task {tname!r}")
                if "name" not in d:
                    raise f.error(dline, f"a dataset of task {tname!r} needs a `name:`")
                dname, d_opts = str(d["name"]), _variants(f, d, "options", f"{tname} task options")
            else:
                dname, d_opts = str(d), [{}]
            try:
                get_dataset(str(tname), dname)
            except UsageError as e:
                raise f.error(dline, str(e)) from None
            for base_opt, extra_opt in itertools.product(task_opts, d_opts):
                opts = {**base_opt, **extra_opt}
                _check_config(f, task_cls.Options, opts, f"{tname} task option", dline)
                tasks.append((str(tname), dname, opts))

    specs: list[RunSpec] = []
    origins: dict[RunSpec, str] = {}
    notes: list[str] = []
    for (bname, pretrained), (mname, mov, origin), (tname, dname, tov), k, s in itertools.product(
        backbones, methods, tasks, shots, seeds
    ):
        if tname not in get_method(mname).tasks:
            note = f"method {mname!r} does not support task {tname!r}: those cells are left out"
            if note not in notes:
                notes.append(note)
            continue
        spec = RunSpec(
            method=mname,
            task=tname,
            dataset=dname,
            backbone=bname,
            pretrained=pretrained,
            shots=k,
            seed=s,
            method_overrides=tuple(sorted(mov.items(), key=lambda kv: kv[0])),
            task_overrides=tuple(sorted(tov.items(), key=lambda kv: kv[0])),
        )
        spec = _hashable(spec)
        if spec not in origins:
            origins[spec] = origin
            specs.append(spec)
    if not specs:
        raise f.error(None, "the grid is empty" + (f" ({'; '.join(notes)})" if notes else ""))

    slurm = doc.get("slurm") or {}
    f.keys(slurm, SLURM_KEYS, "slurm")
    settings = {k: doc.get(k) for k in ("results_dir", "data_root", "split_dir")}
    for k, v in settings.items():
        if v is not None and not isinstance(v, str):
            raise f.error(_line_of(doc, k), f"{k} must be a path, got {v!r}")
    return Experiment(
        path=path,
        name=str(doc.get("name") or path.stem),
        specs=specs,
        origins=origins,
        results_dir=Path(settings["results_dir"] or "results"),
        data_root=Path(settings["data_root"]) if settings["data_root"] else None,
        split_dir=Path(settings["split_dir"]) if settings["split_dir"] else None,
        plugins=plugins,
        device=str(doc.get("device") or "auto"),
        slurm=dict(slurm),
        notes=notes,
    )


def _hashable(spec: RunSpec) -> RunSpec:
    """Lists in overrides become tuples so that RunSpecs can be deduplicated in a dict."""

    def freeze(v: Any) -> Any:
        if isinstance(v, list):
            return tuple(freeze(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, freeze(x)) for k, x in v.items()))
        return v

    return dataclasses.replace(
        spec,
        method_overrides=tuple((k, freeze(v)) for k, v in spec.method_overrides),
        task_overrides=tuple((k, freeze(v)) for k, v in spec.task_overrides),
    )


def _check_config(f: _File, cls: type, overrides: dict[str, Any], what: str, line: int | None) -> None:
    from peftbench.config import build_config

    names = {fl.name for fl in dataclasses.fields(cls)}
    for key in overrides:
        if key not in names:
            line = _line_of(overrides, key) or line
            break
    try:
        build_config(cls, dict(overrides), what=what)
    except UsageError as e:
        raise f.error(line, str(e)) from None
    except (TypeError, ValueError) as e:
        raise f.error(line, f"{what}: {e}") from None


def _variants(f: _File, node: dict, key: str, what: str) -> list[dict[str, Any]]:
    """`options:` is one mapping or a list of mappings (each a variant of the grid)."""
    value = node.get(key)
    if value is None:
        return [{}]
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise f.error(
                _line_of(value, i) or _line_of(node, key), f"{what} must be a mapping, got {item!r}"
            )
    return [dict(i) for i in items] or [{}]


def _str_list(f: _File, doc: dict, key: str) -> list[str]:
    value = doc.get(key) or []
    value = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in value):
        raise f.error(_line_of(doc, key), f"{key} must be a list of paths")
    return value


def _ints(f: _File, doc: dict, key: str, default: list[int], minimum: int) -> list[int]:
    value = doc.get(key, default)
    items = value if isinstance(value, list) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in items):
        raise f.error(
            _line_of(doc, key), f"{key} must be an integer >= {minimum} or a list of them, got {value!r}"
        )
    return list(dict.fromkeys(items))


def _backbones(f: _File, doc: dict) -> list[tuple[str, str | None]]:
    from peftbench.backbone import list_backbones

    node = doc.get("backbones", ["synth-tiny"])
    items = node if isinstance(node, list) else [node]
    if not items:
        raise f.error(_line_of(doc, "backbones"), "the grid is empty: `backbones:` names nothing")
    known = None
    out_: list[tuple[str, str | None]] = []
    for i, item in enumerate(items):
        line = _line_of(node, i) or _line_of(doc, "backbones")
        if isinstance(item, dict):
            f.keys(item, BACKBONE_KEYS, "a backbone")
            if "name" not in item:
                raise f.error(line, "a backbone needs a `name:` (and optionally `pretrained:`)")
            name, pretrained = str(item["name"]), item.get("pretrained", "default")
        else:
            name, pretrained = str(item), "default"
        pretrained = None if pretrained is None or str(pretrained).lower() == "none" else str(pretrained)
        if not (name.endswith(".json") or os.path.sep in name):
            known = known or list_backbones()
            if name not in known:
                hint = closest(name, known)
                did = f" (did you mean {hint!r}?)" if hint else ""
                shown = ", ".join(known[:8])
                raise f.error(
                    line,
                    f"unknown backbone {name!r}{did}; choices: {shown}, ... "
                    "(`peftbench list backbones` shows all) or a path to an open_clip config JSON",
                )
        out_.append((name, pretrained))
    return list(dict.fromkeys(out_))


# ------------------------------------------------------------------------------ the plan
@dataclass
class Cell:
    spec: RunSpec
    config_hash: str | None
    dataset: str
    state: str  # done | running | failed | pending | unresolved
    reason: str = ""  # the failure's (or resolution error's) one line
    estimate_s: float | None = None


def plan(exp: Experiment, store: ResultStore) -> list[Cell]:
    """Resolve every spec (config hash) and look each cell up in the store."""

    from peftbench.runner import get_backbone, resolve

    latest = store.latest_by_cell() if (store.root / "runs").is_dir() else {}
    ok_hashes = set()
    times: dict[tuple[str, str, str], list[float]] = defaultdict(list)  # (method, dataset, backbone)
    for rec in store.iter_records():
        if rec.get("status") != "ok":
            continue
        ok_hashes.add(rec["config_hash"])
        timing = rec.get("timing") or {}
        if timing.get("train_s") is not None:
            key = (rec["spec"]["method"], rec["resolved"]["task"]["dataset"], rec["spec"]["backbone"])
            times[key].append(float(timing["train_s"]) + float(timing.get("eval_s") or 0.0))
    cells: list[Cell] = []
    seen: set[str] = set()
    # Load each backbone once: one that cannot be loaded here (weights not downloadable offline)
    # leaves its cells unresolved with the reason, instead of failing 1,000 times.
    broken: dict[tuple[str, str | None], str] = {}
    for key in dict.fromkeys((s.backbone, s.pretrained) for s in exp.specs):
        try:
            get_backbone(key[0], key[1], torch.device("cpu"))
        except Exception as e:  # noqa: BLE001 - any loading failure is reported per cell
            broken[key] = (
                f"backbone {key[0]} ({key[1]}) cannot be loaded here: {str(e).splitlines()[0][:200]}"
            )
    for spec in exp.specs:
        if (spec.backbone, spec.pretrained) in broken:
            reason = broken[(spec.backbone, spec.pretrained)]
            cells.append(Cell(spec, None, spec.dataset or "?", "unresolved", reason))
            continue
        try:
            run = resolve(spec, torch.device("cpu"))
        except UsageError as e:
            cells.append(Cell(spec, None, spec.dataset or "?", "unresolved", f"{exp.origins[spec]}: {e}"))
            continue
        h = run.config_hash
        if h in seen:  # two spellings of the same resolved cell
            continue
        seen.add(h)
        est = times.get((spec.method, run.dataset, spec.backbone))
        cell = Cell(spec, h, run.dataset, "pending", estimate_s=sum(est) / len(est) if est else None)
        if h in ok_hashes:
            cell.state = "done"
        elif store.is_running(h):
            cell.state = "running"
        elif h in latest and latest[h].get("status") == "failed":
            cell.state, cell.reason = "failed", str(latest[h].get("error") or "failed")
        cells.append(cell)
    return cells


def to_run(cells: list[Cell], retry_failed: bool, limit: int | None) -> list[Cell]:
    chosen = [c for c in cells if c.state == "pending" or (retry_failed and c.state == "failed")]
    return chosen[:limit] if limit is not None else chosen


def estimate(cells: list[Cell]) -> str:
    known = [c.estimate_s for c in cells if c.estimate_s is not None]
    if not cells:
        return "nothing to run"
    if not known:
        return "unknown (no finished run of the same method and dataset yet)"
    total = sum(known)
    text = f"~{_duration(total)} of run time"
    if len(known) < len(cells):
        text += f" for {len(known)} cell(s); unknown for {len(cells) - len(known)}"
    return text


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# ------------------------------------------------------------------------------ jobs
@dataclass(frozen=True)
class JobSettings:
    """What a job needs to run RunSpecs into the store (picklable; no torch objects)."""

    results_dir: str
    data_root: str | None = None
    split_dir: str | None = None
    device: str = "auto"
    loader_workers: int = 0
    plugins: tuple[str, ...] = ()
    retry_failed: bool = False
    executor: str = "inprocess"  # inprocess | local | slurm (written into records)
    log_folder: str | None = None
    threads: int | None = None  # torch threads per job (None: torch's default)
    progress: bool = False
    experiment: str | None = None  # the experiment file (written into records)


class SweepJob(submitit.helpers.Checkpointable):
    """A submitit job that runs a chunk of RunSpecs, one after another, into one store.

    On preemption or timeout submitit calls `checkpoint`, which requeues the RunSpecs this job has
    not finished; the cell that was cut resumes from its epoch checkpoint.
    """

    def __init__(self, settings: JobSettings):
        self.settings = settings
        self.finished = 0  # RunSpecs of this chunk already handled (read by checkpoint())

    def __call__(self, specs: list[RunSpec]) -> list[dict[str, Any]]:
        """Run `specs` in order (finished cells are skipped by the runner); one summary per spec."""
        from peftbench.registry import load_plugins
        from peftbench.results import ResultStore
        from peftbench.runner import execute
        from peftbench.task import DataEnv
        from peftbench.trainer import pick_device

        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        load_plugins([Path(p) for p in s.plugins])
        store = ResultStore(s.results_dir)
        env = DataEnv(
            data_root=Path(s.data_root) if s.data_root else None,
            split_dir=Path(s.split_dir) if s.split_dir else Path(s.results_dir) / "splits",
            workers=s.loader_workers,
            device=pick_device(s.device),
        )
        job = job_info(s)
        results = []
        for spec in specs[self.finished :]:
            outcome = execute(
                spec,
                store,
                env,
                retry_failed=s.retry_failed,
                progress=s.progress,
                checkpoint_dir=Path(s.results_dir) / "checkpoints",
                extra={"job": job},
            )
            rec = outcome.record or {}
            results.append(
                {
                    "config_hash": outcome.config_hash,
                    "status": outcome.status,
                    "error": rec.get("error"),
                    "method": spec.method,
                    "shots": spec.shots,
                    "seed": spec.seed,
                    "dataset": (rec.get("resolved") or {}).get("task", {}).get("dataset"),
                }
            )
            self.finished += 1
        return results

    def checkpoint(self, specs: list[RunSpec]) -> submitit.helpers.DelayedSubmission:
        """Requeue what this job has not finished (called by submitit on preemption/timeout)."""
        remaining = list(specs[self.finished :])
        return submitit.helpers.DelayedSubmission(SweepJob(self.settings), remaining)


def job_info(settings: JobSettings) -> dict[str, Any]:
    """Where this job's logs are: written into each record it appends."""
    info: dict[str, Any] = {
        "executor": settings.executor,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "experiment": settings.experiment,
    }
    if settings.executor == "inprocess" or not settings.log_folder:
        return info
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        return info
    paths = submitit.core.utils.JobPaths(settings.log_folder, job_id=env.job_id, task_id=env.global_rank)
    info.update(id=env.job_id, stdout=str(paths.stdout), stderr=str(paths.stderr), folder=str(paths.folder))
    return info


def chunk(items: list, n_chunks: int) -> list[list]:
    """Round-robin split into at most n_chunks non-empty chunks (order kept within a chunk)."""
    n = max(1, min(n_chunks, len(items)))
    return [items[i::n] for i in range(n)]


def slurm_parameters(slurm: dict[str, Any], name: str) -> dict[str, Any]:
    """The experiment's/CLI's SLURM settings as submitit AutoExecutor parameters."""
    # timeout_min: submitit's own default is 5 minutes; 4 h is a common partition limit, and a job
    # that hits it is requeued with what it had not finished.
    params: dict[str, Any] = {
        "name": f"peftbench-{name}",
        "tasks_per_node": 1,
        "nodes": 1,
        "timeout_min": 240,
    }
    mapping = {
        "partition": "slurm_partition",
        "gpus_per_node": "gpus_per_node",
        "cpus_per_task": "cpus_per_task",
        "mem_gb": "mem_gb",
        "timeout_min": "timeout_min",
        "array_parallelism": "slurm_array_parallelism",
        "additional_parameters": "slurm_additional_parameters",
        "setup": "slurm_setup",
    }
    for key, param in mapping.items():
        if slurm.get(key) is not None:
            params[param] = dict(slurm[key]) if isinstance(slurm[key], dict) else slurm[key]
    return params


def make_executor(
    kind: str, folder: Path, slurm: dict[str, Any], name: str, timeout_min: float
) -> submitit.Executor:
    """A submitit executor: LocalExecutor (processes on this machine) or AutoExecutor on SLURM."""
    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise UsageError(
                "--executor slurm: no SLURM is reachable from here (`sbatch` is not on PATH); "
                "run on a SLURM login node, or use --executor local [--workers N]"
            )
        ex = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=int(slurm.get("max_num_timeout") or 3)
        )
        ex.update_parameters(**slurm_parameters(slurm, name))
        return ex
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=int(slurm.get("max_num_timeout") or 3))
    ex.update_parameters(timeout_min=timeout_min)
    return ex


# ------------------------------------------------------------------------------ commands
def _store_and_settings(
    exp: Experiment, results_dir: Path | None, data_root: Path | None, split_dir: Path | None
) -> tuple[Path, str | None, str | None]:
    rdir = results_dir or exp.results_dir
    root = (
        data_root
        or exp.data_root
        or (Path(os.environ["PEFTBENCH_DATA"]) if os.environ.get("PEFTBENCH_DATA") else None)
    )
    split = split_dir or exp.split_dir
    return rdir, str(root.resolve()) if root else None, str(split.resolve()) if split else None


def _print_plan(cells: list[Cell], title: str) -> None:
    """A table of cell states per method x task x dataset x backbone, then each distinct failure."""
    table = Table(title=title)
    unresolved = any(c.state == "unresolved" for c in cells)
    states = ("done", "running", "failed", "pending") + (("unresolved",) if unresolved else ())
    for col in ("method", "task", "dataset", "backbone", *states):
        table.add_column(col)
    groups: dict[tuple[str, str, str, str], list[Cell]] = defaultdict(list)
    for c in cells:
        groups[(c.spec.method, c.spec.task, c.dataset, c.spec.backbone)].append(c)
    reasons: dict[str, list[str]] = defaultdict(list)  # one-line reason -> the groups it hit
    for key, group in sorted(groups.items()):
        n = Counter(c.state for c in group)
        table.add_row(*key, *(str(n[s]) for s in states))
        for c in group:
            if c.state in ("failed", "unresolved"):
                reasons[c.reason].append(" / ".join(key))
    out.print(table)
    if reasons:
        out.print("failures:")
        for reason, where in reasons.items():
            out.print(
                escape(f"  {reason}  [{len(where)} cell(s), e.g. {where[0]}]"),
                highlight=False,
                soft_wrap=True,
            )


def _counts(cells: list[Cell]) -> dict[str, int]:
    n = Counter(c.state for c in cells)
    return {k: n[k] for k in ("done", "running", "failed", "pending", "unresolved")}


@command("sweep")
def sweep_cmd(
    file: Annotated[Path, typer.Argument(help="An experiment file (experiments/*.yaml).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; run nothing.")] = False,
    limit: Annotated[
        int | None, typer.Option(help="Run at most N of the missing cells (a smoke subset).")
    ] = None,
    executor: Annotated[
        str, typer.Option(help="local (this machine) or slurm (submitit job array).")
    ] = "local",
    workers: Annotated[
        int, typer.Option(help="local: worker processes (1: sequentially in this process).")
    ] = 1,
    retry_failed: Annotated[bool, typer.Option(help="Also rerun cells whose latest record failed.")] = False,
    results_dir: Annotated[
        Path | None, typer.Option(help="The results store (default: the file's results_dir).")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Folder holding the datasets (or PEFTBENCH_DATA).")
    ] = None,
    split_dir: Annotated[
        Path | None, typer.Option(help="Where split files go; default RESULTS_DIR/splits.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda (default: the file's device, else auto).")
    ] = None,
    loader_workers: Annotated[int, typer.Option(help="Data loader worker processes per run.")] = 0,
    plugin: PluginOpt = None,
    partition: Annotated[str | None, typer.Option(help="slurm: partition.")] = None,
    gpus: Annotated[int | None, typer.Option(help="slurm: GPUs per job.")] = None,
    cpus: Annotated[int | None, typer.Option(help="slurm: CPUs per job.")] = None,
    mem_gb: Annotated[float | None, typer.Option(help="slurm: memory per job, GB.")] = None,
    time_min: Annotated[
        int | None, typer.Option(help="Time limit per job in minutes (slurm; local default 7 days).")
    ] = None,
    array_parallelism: Annotated[
        int | None, typer.Option(help="slurm: at most N array jobs at once.")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="slurm: RunSpecs per job (default 1).")] = None,
    sbatch: Annotated[
        list[str] | None, typer.Option(help="slurm: extra sbatch flag KEY=VALUE (repeatable).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="slurm: wait for the jobs and print their outcome.")] = False,
) -> None:
    """Expand an experiment file into runs and run what the store does not have yet."""
    from peftbench.results import ResultStore

    if executor not in EXECUTORS:
        hint = closest(executor, EXECUTORS)
        raise UsageError(
            f"unknown --executor {executor!r}{f' (did you mean {hint!r}?)' if hint else ''}; "
            f"choices: {', '.join(EXECUTORS)}"
        )
    if workers < 1 or (limit is not None and limit < 1) or (chunk_size is not None and chunk_size < 1):
        raise UsageError("--workers, --limit and --chunk-size must be >= 1")
    exp = load_experiment(file, plugin or [])
    slurm = dict(exp.slurm)
    for key, value in (
        ("partition", partition),
        ("gpus_per_node", gpus),
        ("cpus_per_task", cpus),
        ("mem_gb", mem_gb),
        ("timeout_min", time_min),
        ("array_parallelism", array_parallelism),
        ("chunk_size", chunk_size),
    ):
        if value is not None:
            slurm[key] = value
    if sbatch:
        extra = dict(slurm.get("additional_parameters") or {})
        for pair in sbatch:
            k, sep, v = pair.partition("=")
            if not sep or not k.strip():
                raise UsageError(f"--sbatch expects KEY=VALUE such as account=abc or qos=high, got {pair!r}")
            extra[k.strip().lstrip("-").replace("-", "_")] = v
        slurm["additional_parameters"] = extra
    if executor == "slurm" and not dry_run and shutil.which("sbatch") is None:
        make_executor("slurm", Path("."), slurm, exp.name, 0)  # raises the clear error, before any work

    device = device or exp.device
    if executor == "local" and device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} was asked for but no CUDA device is available; use --device cpu")
    rdir, root, split = _store_and_settings(exp, results_dir, data_root, split_dir)
    store = ResultStore(rdir)
    cells = plan(exp, store)
    counts = _counts(cells)
    chosen = to_run(cells, retry_failed, limit)
    for note in exp.notes:
        err.print(f"note: {escape(note)}")
    summary = (
        f"{exp.path}: {len(cells)} cell(s): {counts['done']} done, {counts['running']} running, "
        f"{counts['failed']} failed, {counts['pending']} pending"
        + (f", {counts['unresolved']} unresolved" if counts["unresolved"] else "")
        + f"; will run {len(chosen)}"
        + (f" (--limit {limit})" if limit is not None else "")
        + f"; estimate: {estimate(chosen)}"
    )
    out.print(escape(summary), highlight=False, soft_wrap=True)
    if counts["failed"] and not retry_failed:
        out.print(f"{counts['failed']} failed cell(s) are not rerun; add --retry-failed to rerun them")
    if dry_run:
        _print_plan(cells, f"plan of {exp.name} (store {rdir})")
        for c in chosen:
            out.print(
                escape(
                    f"  run {c.config_hash[:12]}  {c.spec.method} / {c.spec.task} / {c.dataset} / "
                    f"{c.spec.backbone} shots={c.spec.shots} seed={c.spec.seed}"
                    + (f" {dict(c.spec.method_overrides)}" if c.spec.method_overrides else "")
                    + (f" task {dict(c.spec.task_overrides)}" if c.spec.task_overrides else "")
                ),
                highlight=False,
                soft_wrap=True,
            )
        return
    unresolved = [c for c in cells if c.state == "unresolved"]
    if unresolved:
        raise UsageError(f"{len(unresolved)} cell(s) cannot be resolved, e.g. {unresolved[0].reason}")
    if not chosen:
        out.print("nothing to run")
        return

    specs = [c.spec for c in chosen]
    log_root = rdir / "jobs" / f"{exp.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    settings = JobSettings(
        results_dir=str(rdir.resolve()),
        data_root=root,
        split_dir=split,
        device=device,
        loader_workers=loader_workers,
        plugins=tuple(str(p) for p in exp.plugins),
        retry_failed=retry_failed,
        progress=executor == "local" and workers == 1,
        experiment=str(exp.path.resolve()),
    )
    if executor == "local" and workers == 1:
        results = SweepJob(settings)(specs)
        _report(results, rdir)
        return
    if executor == "local":
        settings = dataclasses.replace(
            settings,
            executor="local",
            log_folder=str(log_root.resolve()),
            threads=max(1, (os.cpu_count() or 1) // workers),
        )
        chunks = chunk(specs, workers)
    else:
        settings = dataclasses.replace(
            settings, executor="slurm", log_folder=str((log_root / "%j").resolve())
        )
        per_job = int(slurm.get("chunk_size") or 1)
        chunks = [specs[i : i + per_job] for i in range(0, len(specs), per_job)]
    ex = make_executor(executor, Path(settings.log_folder), slurm, exp.name, float(time_min or 7 * 24 * 60))
    if executor == "local":
        # submitit's LocalExecutor hides every GPU unless asked (CUDA_VISIBLE_DEVICES=""): give each
        # worker one GPU, round-robin, when this machine has any and the device is not forced to CPU.
        n_gpus = torch.cuda.device_count() if settings.device != "cpu" else 0
        jobs = []
        for i, c in enumerate(chunks):
            if n_gpus:
                ex.update_parameters(gpus_per_node=1, visible_gpus=(i % n_gpus,))
            jobs.append(ex.submit(SweepJob(settings), c))
    else:
        try:
            with ex.batch():
                jobs = [ex.submit(SweepJob(settings), c) for c in chunks]
        except Exception as e:  # sbatch refused (bad partition, account, limits): one clear line
            msg = " ".join(str(e).split())[:400]
            raise UsageError(
                f"SLURM refused the job array: {msg} (check --partition, --sbatch flags)"
            ) from None
    ids = ", ".join(str(j.job_id) for j in jobs)
    err.print(
        escape(
            f"submitted {len(jobs)} {executor} job(s) ({ids}); logs in {log_root}; "
            f"watch with `peftbench status {file}{f' --results-dir {rdir}' if results_dir else ''}`"
        ),
        highlight=False,
    )
    if executor == "slurm" and not wait:
        return
    results, crashed = [], []
    for j in jobs:
        try:
            results += j.result()
        except Exception as e:  # a job that died: its cells stay pending; rerunning the sweep finishes them
            crashed.append(
                f"job {j.job_id}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
            )
    _report(results, rdir)
    if crashed:
        err.print(
            escape(
                f"{len(crashed)} job(s) crashed ({'; '.join(crashed)[:300]}); "
                "rerun the same command to finish the missing cells"
            ),
            highlight=False,
        )
        raise typer.Exit(1)


def _report(results: list[dict[str, Any]], rdir: Path) -> None:
    n = Counter(r["status"] for r in results)
    out.print(", ".join(f"{v} {k}" for k, v in sorted(n.items())) or "nothing ran")
    failed = [r for r in results if r["status"] == "failed"]
    for r in failed[:10]:
        out.print(
            escape(
                f"  failed {r['config_hash'][:12]} {r['method']} {r['dataset']} shots={r['shots']} "
                f"seed={r['seed']}: {r['error']}"
            ),
            highlight=False,
        )
    if failed:
        err.print(
            f"{len(failed)} run(s) failed (recorded with their traceback in {rdir}); "
            "rerun them with --retry-failed"
        )
        raise typer.Exit(1)


@command("status")
def status_cmd(
    file: Annotated[Path, typer.Argument(help="An experiment file (experiments/*.yaml).")],
    results_dir: Annotated[
        Path | None, typer.Option(help="The results store (default: the file's results_dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    plugin: PluginOpt = None,
) -> None:
    """Done / running / failed / pending per method x dataset, with the failures' reasons."""
    from peftbench.results import ResultStore

    exp = load_experiment(file, plugin or [])
    store = ResultStore(results_dir or exp.results_dir)
    cells = plan(exp, store)
    if as_json:
        print(
            json.dumps(
                {
                    "counts": _counts(cells),
                    "cells": [
                        {
                            "config_hash": c.config_hash,
                            "method": c.spec.method,
                            "dataset": c.dataset,
                            "backbone": c.spec.backbone,
                            "shots": c.spec.shots,
                            "seed": c.spec.seed,
                            "state": c.state,
                            "reason": c.reason,
                        }
                        for c in cells
                    ],
                },
                indent=1,
            )
        )
        return
    n = _counts(cells)
    _print_plan(
        cells,
        f"{exp.name}: {n['done']} done, {n['running']} running, {n['failed']} failed, "
        f"{n['pending']} pending of {len(cells)} (store {store.root})",
    )
    if getattr(store, "skipped", None):
        err.print(f"warning: skipped {len(store.skipped)} unreadable record(s)")
