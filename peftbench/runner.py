"""RunSpec -> resolve -> (skip?) -> train -> evaluate -> RunRecord.

A RunSpec is what the user asked for (method, task, dataset, backbone, shots, seed and their
overrides). Resolving it fills every default that depends on context (the method's config by
shots, dataset, task and backbone depth; the task's options) and gives the config hash, the
identity of a cell in the results store. The code version is recorded, not hashed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
import resource
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

import peftbench
from peftbench.backbone import Backbone, load_backbone
from peftbench.config import RunContext, build_config, to_dict
from peftbench.errors import NonFiniteLoss, UsageError
from peftbench.method import Method
from peftbench.registry import get_dataset, get_method, get_task
from peftbench.results import SCHEMA_VERSION, CellBusy, ResultStore, new_record_id, utcnow
from peftbench.task import DataEnv
from peftbench.trainer import fit, seed_everything


@dataclass(frozen=True)
class RunSpec:
    """One cell of a grid, as the user gave it (overrides only, defaults unresolved)."""

    method: str = "zeroshot"
    task: str = "classification"
    dataset: str | None = None  # None: the task's default dataset
    backbone: str = "synth-tiny"
    pretrained: str | None = "default"
    shots: int = 16
    seed: int = 1
    method_overrides: tuple[tuple[str, Any], ...] = ()
    task_overrides: tuple[tuple[str, Any], ...] = ()

    def user_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method_overrides"] = dict(self.method_overrides)
        d["task_overrides"] = dict(self.task_overrides)
        return d


@dataclass
class ResolvedRun:
    spec: RunSpec
    dataset: str
    method_cls: type
    method_config: Any
    task: Any
    backbone: Backbone
    resolved: dict[str, Any]
    config_hash: str


@dataclass
class RunOutcome:
    spec: RunSpec
    config_hash: str
    status: str  # ok | failed | skipped-ok | skipped-failed | busy
    record: dict[str, Any] | None = None
    path: Path | None = None


# ------------------------------------------------------------------------------ resolving
_BACKBONES: dict[tuple, Backbone] = {}


def get_backbone(name: str, pretrained: str | None, device: torch.device) -> Backbone:
    """Load once per process; callers get the cached frozen instance (copy before mutating)."""
    key = (name, pretrained, str(device))
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(name, pretrained, device=device)
    return _BACKBONES[key]


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, mtime: float, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_identity(pretrained: str | None) -> str | None:
    """A machine-independent identity of the weights: the tag, or a local file's sha256."""
    if pretrained is None:
        return None
    p = Path(pretrained)
    if p.is_file():
        st = p.stat()
        return f"sha256:{_file_sha256(str(p.resolve()), st.st_mtime, st.st_size)}"
    return pretrained


def resolve(spec: RunSpec, device: torch.device, check_dataset: bool = True) -> ResolvedRun:
    """Fill context-dependent defaults and compute the config hash (raises UsageError).

    check_dataset=False skips the dataset lookup (parameter counting needs no data)."""
    method_cls = get_method(spec.method)
    task_cls = get_task(spec.task)
    if spec.task not in method_cls.tasks:
        raise UsageError(
            f"method {spec.method!r} does not support task {spec.task!r}; "
            f"it supports: {', '.join(method_cls.tasks)}"
        )
    dataset = spec.dataset or task_cls.default_dataset
    if check_dataset:
        get_dataset(spec.task, dataset)
    if spec.shots < 1:
        raise UsageError(f"shots must be >= 1, got {spec.shots}")
    task_options = build_config(task_cls.Options, dict(spec.task_overrides), what=f"{spec.task} task option")
    task = task_cls(task_options)
    backbone = get_backbone(spec.backbone, spec.pretrained, device)
    info = backbone.info
    ctx = RunContext(
        task=spec.task,
        dataset=dataset,
        shots=spec.shots,
        seed=spec.seed,
        n_image_blocks=info.n_image_blocks,
        n_text_blocks=info.n_text_blocks,
        vision_width=info.vision_width,
        text_width=info.text_width,
        embed_dim=info.embed_dim,
    )
    config = build_config(method_cls.Config, dict(spec.method_overrides), what=f"{spec.method} config")
    config = task.resolve_method_config(config.resolve(ctx), ctx)
    resolved = {
        "backbone": {
            "name": spec.backbone,
            "weights": weights_identity(info.pretrained),
            "quick_gelu": info.quick_gelu,
        },
        "method": {"name": spec.method, "config": to_dict(config)},
        "task": {"name": spec.task, "dataset": dataset, "options": to_dict(task_options)},
        "shots": spec.shots,
        "seed": spec.seed,
    }
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()
    return ResolvedRun(spec, dataset, method_cls, config, task, backbone, resolved, digest)


def build_method(run: ResolvedRun, classnames: list[str], template: str) -> Method:
    """The method on its own copy of the backbone (methods may rewrite submodules)."""
    backbone = run.backbone.copy()
    return run.method_cls(backbone, classnames, run.method_config, template=template)


# ------------------------------------------------------------------------------ executing
def execute(
    spec: RunSpec,
    store: ResultStore,
    env: DataEnv,
    force: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> RunOutcome:
    """Run one cell unless the store already has it; append exactly one record if it ran."""
    run = resolve(spec, env.device)
    h = run.config_hash
    try:
        with store.lock(h):
            latest = store.latest(h)
            if latest is not None and not force:
                if latest["status"] == "ok" or store.has_ok(h):
                    return RunOutcome(spec, h, "skipped-ok", latest)
                if not retry_failed:
                    return RunOutcome(spec, h, "skipped-failed", latest)
            record, state = _run(run, env, progress, checkpoint_dir)
            if extra:
                record.update(extra)
            path = store.append(record, state)
            return RunOutcome(spec, h, record["status"], record, path)
    except CellBusy:
        return RunOutcome(spec, h, "busy")


def _run(run: ResolvedRun, env: DataEnv, progress: bool, checkpoint_dir: Path | None):
    spec = run.spec
    started = utcnow()
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "record_id": new_record_id(),
        "config_hash": run.config_hash,
        "spec": spec.user_dict(),
        "resolved": run.resolved,
        "backbone": dataclasses.asdict(run.backbone.info),
        "versions": versions(),
        "host": socket.gethostname(),
        "device": device_name(env.device),
        "started_at": started,
    }
    state = None
    # Bad input (unknown names, missing data) raises UsageError before anything is written.
    seed_everything(spec.seed)
    data = run.task.build(run.dataset, spec.shots, spec.seed, run.backbone, env)
    record["data"] = data.fingerprint
    record["task_info"] = data.info
    model = build_method(run, data.classnames, data.template).to(env.device)
    record["method_info"] = model.describe()
    record["template_policy"] = model.template_policy
    record["params"] = {
        "trainable": model.num_trainable(),
        "total": sum(p.numel() for p in model.parameters()),
    }
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    try:
        model.prepare(data)
        ckpt = checkpoint_dir / f"{run.config_hash}.pt" if checkpoint_dir else None
        stats = fit(
            model,
            run.task,
            data,
            run.method_config,
            env,
            spec.seed,
            ckpt,
            progress,
            description=f"{spec.method} {run.dataset} {spec.shots}-shot seed {spec.seed}",
        )
        model.after_fit(data)
        record["train"] = dataclasses.asdict(stats)
        state = model.trainable_state_dict()
        evaluated = model
        record["merged"] = False
        if model.mergeable:
            evaluated = model.deployed()
            record["merged"] = True
        evaluated.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = run.task.evaluate(evaluated, data, env)
        eval_s = time.perf_counter() - t0
        n_eval = int(metrics.pop("_n_images", 0))
        record["metrics"] = {
            k: {"value": float(v), "direction": run.task.metrics.get(k, "higher")} for k, v in metrics.items()
        }
        record["timing"] = {
            "train_s": stats.seconds,
            "eval_s": eval_s,
            "eval_images": n_eval,
            "eval_images_per_s": n_eval / eval_s if eval_s > 0 and n_eval else None,
        }
        record["status"] = "ok"
    except (NonFiniteLoss, Exception) as e:  # recorded: a failed run never stops a sweep
        if isinstance(e, UsageError):
            raise
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        record["traceback"] = traceback.format_exc()
    record["peak_memory"] = peak_memory(env.device)
    return record, state


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"bytes": int(rss_kb) * 1024, "kind": "process_max_rss"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, Any]:
    sha = None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(peftbench.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            sha = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "peftbench": peftbench.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "git_sha": sha,
    }
