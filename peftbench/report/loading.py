"""Records -> a tidy DataFrame (one row per record and metric).

`load(path)` reads a results store (see `peftbench.results`) with the store's own semantics: the
latest record of each cell (config hash) wins; only `status == "ok"` records become rows. Failed
cells, unreadable or partial records and records of another schema version are not rows: they are
counted and listed in `frame.attrs` (keys `failed`, `skipped`, `refused`) and warned about.

Identity columns (what makes runs different; reports never average across them):
- `task`, `dataset`, `task_options` (the resolved task options as sorted JSON) and `dataset_label`
  (the dataset plus the values of the options that vary between its runs, e.g. `domainnet/sketch`
  for a held-out domain);
- `backbone` (architecture, weights identity and QuickGELU flag, as one label);
- `method` (the registered name), `overrides` (the user's method overrides as sorted JSON) and
  `method_label` (name plus non-default fields, e.g. `mail_pp[bridge=none]`): a method run with its
  defaults is one row whatever the defaults resolved to per dataset or shots;
- `shots`, `seed`, `metric`, `direction`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from peftbench.errors import UsageError
from peftbench.results import SCHEMA_VERSION, ResultStore

REQUIRED = ("spec", "resolved", "metrics")
COLUMNS = [
    "task", "dataset", "task_options", "dataset_label", "backbone", "method", "overrides", "method_label",
    "shots", "seed", "metric", "value", "direction", "trainable", "total", "train_s", "eval_s",
    "eval_images_per_s", "peak_memory_bytes", "peak_memory_kind", "device", "config_hash", "record_id",
    "finished_at",
]  # fmt: skip


def _json(obj: Any) -> str:
    return json.dumps(obj or {}, sort_keys=True, default=str)


def _fmt_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def method_label(name: str, overrides: dict[str, Any]) -> str:
    """`clip_adapter`, or `mail_pp[bridge=none]` for a non-default config."""
    if not overrides:
        return name
    return name + "[" + ",".join(f"{k}={_fmt_value(v)}" for k, v in sorted(overrides.items())) + "]"


def backbone_label(backbone: dict[str, Any]) -> str:
    """`ViT-B-16-quickgelu@openai`; `+quickgelu` when forced on a name without it; `@none`: random weights."""
    name = str(backbone.get("name"))
    weights = str(backbone.get("weights") or "none")
    if weights.startswith("sha256:"):  # a local file: its digest, shortened as git shortens commits
        weights = weights[: len("sha256:") + 12]
    label = f"{name}@{weights}"
    return label + ("+quickgelu" if backbone.get("quick_gelu") and "quickgelu" not in name.lower() else "")


def _check(rec: dict[str, Any]) -> str | None:
    """None if the record can be read, else why it cannot (partial record)."""
    missing = [k for k in REQUIRED if not isinstance(rec.get(k), dict)]
    if missing:
        return f"missing {', '.join(missing)}"
    res = rec["resolved"]
    for path in (("backbone", "name"), ("method", "name"), ("task", "name"), ("task", "dataset")):
        if not isinstance(res.get(path[0]), dict) or path[1] not in res[path[0]]:
            return f"missing resolved.{'.'.join(path)}"
    if "shots" not in res or "seed" not in res:
        return "missing resolved.shots/seed"
    for name, m in rec["metrics"].items():
        if not isinstance(m, dict) or not isinstance(m.get("value"), (int, float)):
            return f"metric {name!r} has no numeric value"
    return None


def _rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    res, spec = rec["resolved"], rec.get("spec") or {}
    overrides = spec.get("method_overrides") or {}
    if isinstance(overrides, list):  # tuples of pairs, as a RunSpec holds them
        overrides = dict(overrides)
    params, timing, mem = rec.get("params") or {}, rec.get("timing") or {}, rec.get("peak_memory") or {}
    base = {
        "task": res["task"]["name"],
        "dataset": res["task"]["dataset"],
        "task_options": _json(res["task"].get("options")),
        "backbone": backbone_label(res["backbone"]),
        "method": res["method"]["name"],
        "overrides": _json(overrides),
        "method_label": method_label(res["method"]["name"], overrides),
        "shots": int(res["shots"]),
        "seed": int(res["seed"]),
        "trainable": params.get("trainable"),
        "total": params.get("total"),
        "train_s": timing.get("train_s"),
        "eval_s": timing.get("eval_s"),
        "eval_images_per_s": timing.get("eval_images_per_s"),
        "peak_memory_bytes": mem.get("bytes"),
        "peak_memory_kind": mem.get("kind"),
        "device": rec.get("device"),
        "config_hash": rec["config_hash"],
        "record_id": rec.get("record_id"),
        "finished_at": rec.get("finished_at"),
    }
    return [
        {**base, "metric": name, "value": float(m["value"]), "direction": m.get("direction", "higher")}
        for name, m in rec["metrics"].items()
    ]


def _dataset_labels(frame: pd.DataFrame) -> pd.Series:
    """dataset + the values of the task options that vary between runs of that (task, dataset)."""
    labels = pd.Series(frame["dataset"].astype(str), index=frame.index)
    for (_task, dataset), group in frame.groupby(["task", "dataset"], sort=False):
        opts = {s: json.loads(s) for s in group["task_options"].unique()}
        keys = sorted({k for o in opts.values() for k in o})
        varying = [k for k in keys if len({_json(o.get(k)) for o in opts.values()}) > 1]
        if not varying:
            continue
        for s, o in opts.items():
            idx = group.index[group["task_options"] == s]
            labels[idx] = dataset + "/" + "/".join(_fmt_value(o.get(k)) for k in varying)
    return labels


def load(path: str | Path, quiet: bool = False) -> pd.DataFrame:
    """Read the results store at `path` into one row per (ok record, metric); see the module doc.

    Raises UsageError if `path` is not a folder. An empty frame (with `attrs`) if nothing is usable.
    """
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"--results-dir {root} is not a folder; produce runs with `peftbench run ...`")
    store = ResultStore(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        latest = store.latest_by_cell()
    skipped = list(store.skipped)
    refused: list[str] = []
    failed: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for rec in sorted(latest.values(), key=lambda r: r["_path"]):
        schema = rec.get("schema")
        if schema != SCHEMA_VERSION:
            why = (
                "newer than this peftbench reads; upgrade peftbench"
                if isinstance(schema, int) and schema > SCHEMA_VERSION
                else "not a schema this peftbench knows"
            )
            refused.append(f"{rec['_path']}: schema {schema!r}, expected {SCHEMA_VERSION} ({why})")
            continue
        if rec.get("status") != "ok":
            spec = rec.get("spec") or {}
            failed.append(
                {
                    "path": rec["_path"],
                    "config_hash": rec["config_hash"],
                    "status": rec.get("status"),
                    "method": spec.get("method"),
                    "dataset": spec.get("dataset"),
                    "shots": spec.get("shots"),
                    "seed": spec.get("seed"),
                    "error": rec.get("error"),
                }
            )
            continue
        why = _check(rec)
        if why is not None:
            skipped.append(f"{rec['_path']}: partial record ({why})")
            continue
        rows.extend(_rows(rec))
    frame = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "dataset_label"])
    frame.insert(3, "dataset_label", _dataset_labels(frame) if len(frame) else pd.Series(dtype=str))
    frame.attrs.update(failed=failed, skipped=skipped, refused=refused, root=str(root))
    if not quiet:
        if skipped:
            warnings.warn(
                f"skipped {len(skipped)} unreadable or partial record(s), e.g. {skipped[0]}", stacklevel=2
            )
        if refused:
            warnings.warn(
                f"refused {len(refused)} record(s) of another schema version, e.g. {refused[0]}", stacklevel=2
            )
    return frame
