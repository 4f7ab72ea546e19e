"""The Task contract: data for (dataset, shots, seed), the loss, and the evaluator.

    @register_task("classification")
    class Classification(Task):
        Options = ClassificationOptions     # task options (frozen dataclass), hashed into the run
        metrics = {"acc": "higher"}         # every metric with its direction
        primary_metric = "acc"
        default_dataset = "synth"
        def build(self, dataset, shots, seed, backbone, env) -> TaskData: ...
        def loss(self, model, batch) -> Tensor: ...
        def evaluate(self, model, data, env) -> dict[str, float]: ...

Model selection never looks at test data: the last iterate is evaluated (or a method selects on
`data.val`).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from peftbench.errors import UsageError


@dataclass(frozen=True)
class TaskOptions:
    """Options shared by every task; tasks subclass this with their own (e.g. held-out domain)."""


@dataclass
class DataEnv:
    """Where data lives and how to read it (not part of a run's identity; recorded)."""

    data_root: Path | None = None
    split_dir: Path = Path("results/splits")
    workers: int = 0
    eval_batch_size: int = 128
    strict_shots: bool = False
    skip_corrupt: bool = False
    progress: bool = True  # progress bars on stderr for long evaluations
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class TaskData:
    """Everything a run needs from a task, built once per (dataset, shots, seed)."""

    classnames: list[str]  # the classes the method's head is built for (training classes)
    template: str  # the dataset's hand-written prompt template
    train: Dataset
    val: Dataset | None
    test: Any  # task-specific evaluation sets
    fingerprint: dict[str, Any]  # split file + sha256, hash of the file list read, counts
    info: dict[str, Any] = field(default_factory=dict)  # warnings, resolved options: recorded


class Task:
    name: ClassVar[str] = "?"
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    metrics: ClassVar[dict[str, str]] = {}
    primary_metric: ClassVar[str] = ""
    default_dataset: ClassVar[str] = ""

    def __init__(self, options: TaskOptions | None = None):
        self.options = options if options is not None else self.Options()

    def build(self, dataset: str, shots: int, seed: int, backbone, env: DataEnv) -> TaskData:
        raise NotImplementedError

    def resolve_method_config(self, config, ctx):
        """Adjust a method's resolved config to this task's recipe (e.g. UCDR fixes the run length
        and batch composition for every method). Runs before hashing. Default: unchanged."""
        return config

    def train_loader(self, data: TaskData, batch_size: int, seed: int, env: DataEnv) -> DataLoader:
        """Shuffled mini-batches, seeded (same order on every run of the same spec)."""
        g = torch.Generator().manual_seed(seed)
        return DataLoader(
            data.train,
            batch_size=min(batch_size, len(data.train)),
            shuffle=True,
            generator=g,
            num_workers=env.workers,
            worker_init_fn=seed_worker,
            drop_last=False,
        )

    def loss(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model, data: TaskData, env: DataEnv) -> dict[str, float]:
        raise NotImplementedError


class DatasetReader:
    """Base of dataset readers: `folder` under the data root, and the `layout` shown when it is wrong."""

    name: ClassVar[str] = "?"
    folder: ClassVar[str] = ""  # sub-folder of the data root
    layout: ClassVar[str] = ""  # the expected layout, shown when the root is wrong

    def root(self, env: DataEnv) -> Path:
        """`<data-root>/<folder>`, or a UsageError with the expected tree and the path tried."""
        if env.data_root is None:
            raise UsageError(
                f"dataset {self.name!r} needs a data root: pass --data-root DIR or set PEFTBENCH_DATA "
                f"(expected layout: {self.layout})"
            )
        root = Path(env.data_root) / self.folder
        if not root.is_dir():
            raise UsageError(f"dataset {self.name!r}: {root} not found (expected layout: {self.layout})")
        return root


# ------------------------------------------------------------------------------ images
SKIPPED = -100  # the label of an unreadable image skipped with --skip-corrupt (cross-entropy ignores it)


class ImageList(Dataset):
    """(image, label) or (image, label, domain) from relative paths under a root.

    With skip_corrupt, an unreadable image is replaced by a blank one and its label by SKIPPED,
    so training ignores it and evaluation can exclude and count it, also across loader workers.
    """

    def __init__(
        self,
        root: Path,
        items: Sequence[tuple],
        transform,
        invert: Sequence[bool] | bool = False,
        skip_corrupt: bool = False,
    ):
        self.root = Path(root)
        self.items = list(items)
        self.transform = transform
        self.invert = invert
        self.skip_corrupt = skip_corrupt
        self.corrupt: list[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Image.Image:
        rel = self.items[index][0]
        path = self.root / rel
        try:
            with Image.open(path) as im:
                im.load()
                img = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            if not self.skip_corrupt:
                raise UsageError(
                    f"cannot read image {path}: {e} (pass --skip-corrupt to skip such files)"
                ) from e
            self.corrupt.append(str(rel))
            img = Image.new("RGB", (8, 8))
        invert = self.invert[index] if isinstance(self.invert, (list, tuple)) else self.invert
        return ImageOps.invert(img) if invert else img

    def __getitem__(self, index: int):
        item = self.items[index]
        n_corrupt = len(self.corrupt)
        image = self.transform(self.load(index))
        if len(self.corrupt) > n_corrupt:  # skipped: label SKIPPED travels with the batch (worker-safe)
            return (image, SKIPPED, *item[2:])
        return (image, *item[1:])


def eval_batches(loader: DataLoader, env: DataEnv, description: str = "evaluate"):
    """Iterate over an evaluation loader with a transient progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        disable=not env.progress,
        transient=True,
    ) as bar:
        yield from bar.track(loader, total=len(loader), description=description)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and python in loader workers from torch's per-worker seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# ------------------------------------------------------------------------------ splits
def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_files_exist(root: Path, rel_paths: list[str], dataset: str) -> None:
    """One error with the count and the first few paths when listed files are missing."""
    missing = [p for p in rel_paths if not (root / p).is_file()]
    if missing:
        first = ", ".join(missing[:3])
        raise UsageError(
            f"{dataset}: {len(missing)} file(s) listed in the split are missing under {root}, e.g. {first}"
        )


def files_fingerprint(paths: Sequence[str]) -> str:
    """sha256 of the sorted list of files read."""
    return sha256_text("\n".join(sorted(paths)))


def write_json_atomic(path: Path, obj: Any) -> str:
    """Write JSON atomically; returns its sha256."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=1, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_text(text)
