"""Deterministic few-shot sampling, written to readable JSON split files.

A split is a pure function of (dataset, shots, seed) and the candidate lists: for each group
(a class, or a (class, domain) pair) the candidates are sorted by path and `shots` are drawn
without replacement by a `random.Random` seeded with the string "<dataset>|<shots>|<seed>|<group>"
(string seeds are hashed with SHA-512 by Python, so the draw is the same on every machine and
every process). A group with fewer candidates than `shots` keeps all it has, with a warning; the
split file records it. Validation: min(shots, 4) per group, drawn the same way from the val pool
(or, when a dataset has none, from the candidates not drawn as shots).

The file stores relative paths only, so it can be shared and diffed. If a split file already
exists it must agree with the draw (else the run refuses: someone changed the data or the file).
"""

from __future__ import annotations

import json
import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftbench.errors import UsageError
from peftbench.task import sha256_text, write_json_atomic

SPLIT_SCHEMA = 1
Item = tuple  # (relative_path, label, *extra) with extra e.g. a domain


def draw(candidates: Sequence[Item], k: int, key: str) -> list[Item]:
    """k items of `candidates` (sorted by path first) drawn by a RNG seeded with `key`."""
    pool = sorted(candidates, key=lambda it: it[0])
    if k >= len(pool):
        return pool
    rng = random.Random(key)
    picked = rng.sample(range(len(pool)), k)
    return [pool[i] for i in picked]


def sample_fewshot(
    dataset: str,
    shots: int,
    seed: int,
    train_pool: Sequence[Item],
    val_pool: Sequence[Item] | None = None,
    group_of=lambda it: it[1],
    group_names: dict[Any, str] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """The few-shot split of `train_pool` (and of `val_pool`), as a JSON-ready dict."""
    if shots < 1:
        raise UsageError(f"shots must be >= 1, got {shots}")
    by_group: dict[Any, list[Item]] = defaultdict(list)
    for it in train_pool:
        by_group[group_of(it)].append(it)
    val_by_group: dict[Any, list[Item]] = defaultdict(list)
    for it in val_pool or ():
        val_by_group[group_of(it)].append(it)

    train, val, short = [], [], {}
    n_val = min(shots, 4)
    for g in sorted(by_group, key=str):
        gname = (group_names or {}).get(g, str(g))
        picked = draw(by_group[g], shots, f"{dataset}|{shots}|{seed}|{gname}")
        if len(picked) < shots:
            short[gname] = len(picked)
        train += picked
        if val_pool is not None:
            val += draw(val_by_group.get(g, []), n_val, f"{dataset}|{shots}|{seed}|{gname}|val")
        else:
            chosen = {it[0] for it in picked}
            rest = [it for it in by_group[g] if it[0] not in chosen]
            val += draw(rest, n_val, f"{dataset}|{shots}|{seed}|{gname}|val")
    if short:
        msg = (
            f"{dataset}: {len(short)} group(s) have fewer than {shots} images and keep all they have "
            f"(e.g. {next(iter(short))}: {next(iter(short.values()))})"
        )
        if strict:
            raise UsageError(msg + "; drop --strict-shots to allow this")
        warnings.warn(msg, stacklevel=2)
    return {
        "schema": SPLIT_SCHEMA,
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "rule": "per group, sorted by path, random.Random('<dataset>|<shots>|<seed>|<group>').sample",
        "short_groups": short,
        "train": [list(it) for it in train],
        "val": [list(it) for it in val],
    }


def split_path(split_dir: Path, task: str, dataset: str, shots: int, seed: int, tag: str = "") -> Path:
    suffix = f"_{tag}" if tag else ""
    return Path(split_dir) / task / dataset / f"shots{shots}_seed{seed}{suffix}.json"


def write_or_check(path: Path, split: dict[str, Any]) -> str:
    """Write the split file, or check an existing one agrees; returns the file's sha256."""
    if path.exists():
        existing = json.loads(path.read_text())
        if existing.get("train") != split["train"] or existing.get("val") != split["val"]:
            raise UsageError(
                f"split file {path} disagrees with the draw from the data on disk; the data changed or "
                "the file was edited. Delete the file to redraw it, or restore the data"
            )
        return sha256_text(path.read_text())
    return write_json_atomic(path, split)
