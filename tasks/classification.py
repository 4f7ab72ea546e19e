"""Few-shot image classification (CoOp protocol; protocols.md).

K training images per class and min(K, 4) validation images per class, drawn by
`peftbench.fewshot` and written to a JSON split file; top-1 accuracy (%) on the full test split.
Loss: cross-entropy of the method's logits. The last iterate is evaluated.

Datasets are registered with `@register_dataset("classification", "<id>")` and return a
:class:`ClassificationSource` (relative image paths under one root, with labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from peftbench.backbone import CROP_SCALE
from peftbench.errors import UsageError
from peftbench.fewshot import sample_fewshot, split_path, write_or_check
from peftbench.registry import get_dataset, register_dataset, register_task
from peftbench.task import (
    SKIPPED,
    DataEnv,
    DatasetReader,
    ImageList,
    Task,
    TaskData,
    TaskOptions,
    check_files_exist,
    eval_batches,
    files_fingerprint,
)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ClassificationSource:
    """A dataset as read from disk: paths are relative to `root`."""

    root: Path
    classnames: list[str]
    template: str
    train: list[tuple[str, int]]
    val: list[tuple[str, int]] | None  # None: draw validation from unused training images
    test: list[tuple[str, int]]
    notes: list[str] | None = None
    train_crop_scale: tuple[float, float] = CROP_SCALE  # random-resized-crop area range (CoOp's default)


class ClassificationDataset(DatasetReader):
    """Base for classification datasets: `load(env)` reads the disk layout."""

    template = "a photo of a {}."

    def load(self, env: DataEnv) -> ClassificationSource:
        raise NotImplementedError


@dataclass(frozen=True)
class ClassificationOptions(TaskOptions):
    pass


@register_task("classification")
class Classification(Task):
    Options = ClassificationOptions
    metrics = {"acc": "higher"}
    primary_metric = "acc"
    default_dataset = "synth"

    def build(self, dataset: str, shots: int, seed: int, backbone, env: DataEnv) -> TaskData:
        source = get_dataset(self.name, dataset)().load(env)
        split = sample_fewshot(
            dataset,
            shots,
            seed,
            source.train,
            source.val,
            strict=env.strict_shots,
            group_names=dict(enumerate(source.classnames)),
        )
        split["classnames"] = source.classnames
        path = split_path(env.split_dir, self.name, dataset, shots, seed)
        split_sha = write_or_check(path, split)
        train_items = [tuple(it) for it in split["train"]]
        val_items = [tuple(it) for it in split["val"]]
        check_files_exist(source.root, [it[0] for it in train_items + val_items + source.test], dataset)
        return TaskData(
            classnames=source.classnames,
            template=source.template,
            train=ImageList(
                source.root,
                train_items,
                backbone.make_train_transform(source.train_crop_scale),
                skip_corrupt=env.skip_corrupt,
            ),
            val=ImageList(source.root, val_items, backbone.eval_transform, skip_corrupt=env.skip_corrupt),
            test=ImageList(source.root, source.test, backbone.eval_transform, skip_corrupt=env.skip_corrupt),
            fingerprint={
                "split_file": str(path),
                "split_sha256": split_sha,
                "files_sha256": files_fingerprint([it[0] for it in train_items + val_items + source.test]),
                "n_train": len(train_items),
                "n_val": len(val_items),
                "n_test": len(source.test),
                "n_classes": len(source.classnames),
                "short_groups": split["short_groups"],
            },
            info={"notes": source.notes or [], "train_crop_scale": list(source.train_crop_scale)},
        )

    def loss(self, model, batch) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        return F.cross_entropy(model.logits(images), labels)

    def evaluate(self, model, data: TaskData, env: DataEnv) -> dict[str, float]:
        loader = DataLoader(data.test, batch_size=env.eval_batch_size, num_workers=env.workers)
        correct = total = skipped = 0
        for images, labels in eval_batches(loader, env, f"evaluate ({len(data.test)} images)"):
            images, labels = images.to(env.device), labels.to(env.device)
            keep = labels != SKIPPED  # unreadable images skipped with --skip-corrupt are not scored
            skipped += int((~keep).sum())
            pred = model.logits(images).argmax(dim=-1)
            correct += int((pred == labels)[keep].sum())
            total += int(keep.sum())
        if skipped:
            data.info["corrupt_skipped"] = skipped
        return {"acc": 100.0 * correct / max(total, 1), "_n_images": total + skipped}


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@register_dataset("classification", "imagefolder")
class ImageFolder(ClassificationDataset):
    """A generic folder dataset: the data root itself is the dataset.

    Layout: <root>/{train,val,test}/<class>/<image>, or <root>/<class>/<image>; in the latter
    case each class's sorted images are split by position: of every 5, 3 train, 1 val, 1 test
    (a fixed rule independent of the run's seed).
    """

    layout = "<data-root>/<class>/<image> or <data-root>/{train,val,test}/<class>/<image>"
    template = "a photo of a {}."

    def load(self, env: DataEnv) -> ClassificationSource:
        root = self.root(env)
        if (root / "train").is_dir() and (root / "test").is_dir():
            classnames = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
            parts = {}
            for part in ("train", "val", "test"):
                items = []
                for label, c in enumerate(classnames):
                    folder = root / part / c
                    if folder.is_dir():
                        items += [(str(p.relative_to(root)), label) for p in list_images(folder)]
                parts[part] = items
            val = parts["val"] if (root / "val").is_dir() else None
            train, test = parts["train"], parts["test"]
        else:
            classnames = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            train, val, test = [], [], []
            for label, c in enumerate(classnames):
                for i, p in enumerate(list_images(root / c)):
                    item = (str(p.relative_to(root)), label)
                    (train if i % 5 < 3 else val if i % 5 == 3 else test).append(item)
        if not classnames or not test:
            raise UsageError(
                f"dataset 'imagefolder': no class folders with images under {root} (expected {self.layout})"
            )
        return ClassificationSource(root, classnames, self.template, train, val, test)
