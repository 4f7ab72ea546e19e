"""The 11 few-shot classification datasets of CoOp (Zhou et al., "Learning to Prompt for
Vision-Language Models", IJCV 2022), read in the folder layout of CoOp's DATASETS.md.

Each dataset sits under the data root (`--data-root` or `PEFTBENCH_DATA`) in CoOp's folder name:

    imagenet/        images/train/<wnid>/*, images/val/<wnid>/* (the test set), classnames.txt
    caltech-101/     101_ObjectCategories/, split_zhou_Caltech101.json
    oxford_pets/     images/, split_zhou_OxfordPets.json
    stanford_cars/   cars_train/, cars_test/, split_zhou_StanfordCars.json (paths relative to the folder)
    oxford_flowers/  jpg/, split_zhou_OxfordFlowers.json
    food-101/        images/, split_zhou_Food101.json
    fgvc_aircraft/   images/, variants.txt, images_variant_{train,val,test}.txt
    sun397/          SUN397/, split_zhou_SUN397.json
    dtd/             images/, split_zhou_DescribableTextures.json
    eurosat/         2750/, split_zhou_EuroSAT.json
    ucf101/          UCF-101-midframes/, split_zhou_UCF101.json

`split_zhou_<Name>.json` = {"train"|"val"|"test": [[relative_path, label, classname], ...]}, paths
relative to the dataset's image folder (CoOp's `OxfordPets.read_split`). FGVCAircraft reads the
official variant lists (labels in the order of variants.txt, as CoOp's `FGVCAircraft` reader does).
ImageNet has no validation split: its val folder is the test set, and the task draws min(K, 4)
validation images per class from the training images not drawn as shots (`val=None`); labels follow
the sorted wnids, as CoOp's reader (sorted class folders) gives them.

Readers only list files and parse the list files; the classification task draws the few-shot split,
writes the split file and checks that every listed file exists (tasks/classification.py). Templates
are the per-dataset ones of protocols.md (CoOp's `CUSTOM_TEMPLATES`). Nothing here is trainable.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import ClassVar

from peftbench.errors import UsageError
from peftbench.registry import register_dataset
from peftbench.task import DataEnv
from peftbench.tasks.classification import (
    IMAGE_EXTENSIONS,
    ClassificationDataset,
    ClassificationSource,
)

TASK = "classification"

# Per-dataset templates (protocols.md; CoOp's trainers/zsclip.py CUSTOM_TEMPLATES).
TEMPLATES: dict[str, str] = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}

Items = list[tuple[str, int]]
_EXTENSIONS = tuple(IMAGE_EXTENSIONS)  # str.endswith takes a tuple: the fast test for ImageNet's 1.3M files


class CoOpDataset(ClassificationDataset):
    """A CoOp dataset folder: checks its expected entries and names them when one is missing."""

    folder: ClassVar[str] = ""  # CoOp's `dataset_dir`
    required: ClassVar[tuple[str, ...]] = ()  # entries that must exist; a trailing "/" marks a folder

    @property
    def layout(self) -> str:  # type: ignore[override]
        return f"<data-root>/{self.folder}/{{{', '.join(self.required)}}} (CoOp's DATASETS.md)"

    @property
    def template(self) -> str:  # type: ignore[override]
        return TEMPLATES[self.name]

    def dataset_root(self, env: DataEnv) -> Path:
        """The dataset's folder, with every required entry present (else one line: tree + path)."""
        root = self.root(env)
        for entry in self.required:
            path = root / entry.rstrip("/")
            ok = path.is_dir() if entry.endswith("/") else path.is_file()
            if not ok:
                raise UsageError(
                    f"dataset {self.name!r}: {path} not found; expected {self.layout} under the data root "
                    f"{env.data_root}"
                )
        return root


def warn_unlisted_folders(
    dataset: str, folder: Path, listed: set[str], ignore: frozenset[str] = frozenset()
) -> str | None:
    """Warn (and return the note) when `folder` holds class folders that no list mentions."""
    present = {e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}
    extra = sorted(present - listed - ignore)
    if not extra:
        return None
    note = (
        f"{dataset}: {len(extra)} class folder(s) under {folder} are in no list and are ignored "
        f"(e.g. {', '.join(extra[:3])})"
    )
    warnings.warn(note, stacklevel=3)
    return note


# ------------------------------------------------------------------------------ split_zhou_*.json
class ZhouSplitDataset(CoOpDataset):
    """A dataset with CoOp's fixed train/val/test split file `split_zhou_<Name>.json`."""

    image_dir: ClassVar[str] = ""  # CoOp's `image_dir`, relative to the dataset folder ("" = the folder)
    split_file: ClassVar[str] = ""
    class_folders: ClassVar[bool] = False  # images sit in one folder per class: warn on unlisted ones
    ignored_folders: ClassVar[frozenset[str]] = frozenset()  # folders CoOp itself leaves out

    def load(self, env: DataEnv) -> ClassificationSource:
        root = self.dataset_root(env)
        image_root = root / self.image_dir if self.image_dir else root
        split_path = root / self.split_file
        parts, classnames = read_zhou_split(split_path)
        notes = [f"train/val/test and class names from {self.split_file} (CoOp's fixed split)"]
        if self.class_folders:
            listed = {p.split("/", 1)[0] for part in parts.values() for p, _ in part}
            note = warn_unlisted_folders(self.name, image_root, listed, self.ignored_folders)
            if note:
                notes.append(note)
        return ClassificationSource(
            image_root, classnames, self.template, parts["train"], parts["val"], parts["test"], notes
        )


def read_zhou_split(path: Path) -> tuple[dict[str, Items], list[str]]:
    """{"train"|"val"|"test": [[path, label, classname], ...]} -> items per part, class names by label."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read split file {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("train", "val", "test")):
        raise UsageError(f"split file {path} must be a JSON object with lists 'train', 'val' and 'test'")
    names: dict[int, str] = {}
    parts: dict[str, Items] = {}
    for part in ("train", "val", "test"):
        items: Items = []
        for i, entry in enumerate(data[part]):
            try:
                rel, label, classname = entry
                label = int(label)
            except (TypeError, ValueError):
                raise UsageError(
                    f"split file {path}: {part}[{i}] = {entry!r} is not [relative_path, label, classname]"
                ) from None
            if names.setdefault(label, classname) != classname:
                raise UsageError(
                    f"split file {path}: label {label} is both {names[label]!r} and {classname!r} "
                    f"({part}[{i}])"
                )
            items.append((str(rel), label))
        parts[part] = items
    n = len(names)
    if not parts["train"] or not parts["test"] or sorted(names) != list(range(n)):
        raise UsageError(
            f"split file {path}: expected non-empty train and test lists with labels 0..{n - 1}; "
            f"got {len(parts['train'])} train, {len(parts['test'])} test items and labels "
            f"{sorted(names)[:5]}..."
        )
    return parts, [names[i] for i in range(n)]


@register_dataset(TASK, "caltech101")
class Caltech101(ZhouSplitDataset):
    """Caltech101 (Fei-Fei et al., 2004), 100 classes in CoOp's split (no background class)."""

    folder = "caltech-101"
    image_dir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    required = ("101_ObjectCategories/", "split_zhou_Caltech101.json")
    class_folders = True
    ignored_folders = frozenset({"BACKGROUND_Google", "Faces_easy"})  # left out by CoOp's caltech101.py


@register_dataset(TASK, "oxford_pets")
class OxfordPets(ZhouSplitDataset):
    """Oxford-IIIT Pets (Parkhi et al., CVPR 2012), 37 breeds."""

    folder = "oxford_pets"
    image_dir = "images"
    split_file = "split_zhou_OxfordPets.json"
    required = ("images/", "split_zhou_OxfordPets.json")


@register_dataset(TASK, "stanford_cars")
class StanfordCars(ZhouSplitDataset):
    """Stanford Cars (Krause et al., 2013), 196 models; split paths are relative to the folder."""

    folder = "stanford_cars"
    image_dir = ""
    split_file = "split_zhou_StanfordCars.json"
    required = ("cars_train/", "cars_test/", "split_zhou_StanfordCars.json")


@register_dataset(TASK, "oxford_flowers")
class OxfordFlowers(ZhouSplitDataset):
    """Oxford Flowers102 (Nilsback and Zisserman, 2008), 102 species."""

    folder = "oxford_flowers"
    image_dir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    required = ("jpg/", "split_zhou_OxfordFlowers.json")


@register_dataset(TASK, "food101")
class Food101(ZhouSplitDataset):
    """Food-101 (Bossard et al., ECCV 2014), 101 dishes."""

    folder = "food-101"
    image_dir = "images"
    split_file = "split_zhou_Food101.json"
    required = ("images/", "split_zhou_Food101.json")
    class_folders = True


@register_dataset(TASK, "sun397")
class SUN397(ZhouSplitDataset):
    """SUN397 (Xiao et al., CVPR 2010), 397 scene categories."""

    folder = "sun397"
    image_dir = "SUN397"
    split_file = "split_zhou_SUN397.json"
    required = ("SUN397/", "split_zhou_SUN397.json")


@register_dataset(TASK, "dtd")
class DTD(ZhouSplitDataset):
    """Describable Textures (Cimpoi et al., CVPR 2014), 47 textures."""

    folder = "dtd"
    image_dir = "images"
    split_file = "split_zhou_DescribableTextures.json"
    required = ("images/", "split_zhou_DescribableTextures.json")
    class_folders = True


@register_dataset(TASK, "eurosat")
class EuroSAT(ZhouSplitDataset):
    """EuroSAT RGB (Helber et al., 2019), 10 land-use classes (CoOp's readable class names)."""

    folder = "eurosat"
    image_dir = "2750"
    split_file = "split_zhou_EuroSAT.json"
    required = ("2750/", "split_zhou_EuroSAT.json")
    class_folders = True


@register_dataset(TASK, "ucf101")
class UCF101(ZhouSplitDataset):
    """UCF101 middle frames (Soomro et al., 2012), 101 actions."""

    folder = "ucf101"
    image_dir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"
    required = ("UCF-101-midframes/", "split_zhou_UCF101.json")
    class_folders = True


# ------------------------------------------------------------------------------ FGVCAircraft
@register_dataset(TASK, "fgvc_aircraft")
class FGVCAircraft(CoOpDataset):
    """FGVC-Aircraft (Maji et al., 2013), 100 variants, from the official variant lists.

    variants.txt gives the classes (label = line order); images_variant_<part>.txt has lines
    "<image id> <variant name>" and the image is images/<image id>.jpg.
    """

    folder = "fgvc_aircraft"
    required = (
        "images/",
        "variants.txt",
        "images_variant_train.txt",
        "images_variant_val.txt",
        "images_variant_test.txt",
    )

    def load(self, env: DataEnv) -> ClassificationSource:
        root = self.dataset_root(env)
        classnames = [ln.strip() for ln in read_lines(root / "variants.txt") if ln.strip()]
        label_of = {c: i for i, c in enumerate(classnames)}
        if not classnames or len(label_of) != len(classnames):
            raise UsageError(f"{root / 'variants.txt'}: expected one distinct variant name per line")
        parts: dict[str, Items] = {}
        for part in ("train", "val", "test"):
            path = root / f"images_variant_{part}.txt"
            items: Items = []
            for n, line in enumerate(read_lines(path), 1):
                if not line.strip():
                    continue
                image_id, _, variant = line.strip().partition(" ")
                if variant not in label_of:
                    raise UsageError(
                        f"{path}:{n}: variant {variant!r} is not in variants.txt "
                        "(expected '<image id> <variant>')"
                    )
                items.append((f"{image_id}.jpg", label_of[variant]))
            parts[part] = items
        if not parts["train"] or not parts["test"]:
            raise UsageError(f"dataset 'fgvc_aircraft': empty train or test list under {root}")
        return ClassificationSource(
            root / "images", classnames, self.template, parts["train"], parts["val"], parts["test"],
            ["train/val/test from the official images_variant_*.txt lists; labels in variants.txt order"],
        )


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


# ------------------------------------------------------------------------------ ImageNet
@register_dataset(TASK, "imagenet")
class ImageNet(CoOpDataset):
    """ImageNet-1k (Deng et al., CVPR 2009): images/train and images/val (the test set) in wnid
    folders, class names from classnames.txt ("<wnid> <class name>" per line, CLIP's names).

    There is no validation split: the task draws min(K, 4) validation images per class from the
    training images not drawn as shots (protocols.md).
    """

    folder = "imagenet"
    required = ("images/train/", "images/val/", "classnames.txt")

    def load(self, env: DataEnv) -> ClassificationSource:
        root = self.dataset_root(env)
        names = read_classnames(root / "classnames.txt")
        wnids = sorted(names)  # CoOp labels the sorted class folders
        label_of = {w: i for i, w in enumerate(wnids)}
        notes = ["test = images/val; validation drawn from training images not drawn as shots"]
        parts: dict[str, Items] = {}
        for part in ("train", "val"):
            folder = root / "images" / part
            note = warn_unlisted_folders(self.name, folder, set(names))
            if note:
                notes.append(note)
            items: Items = []
            absent = []
            for w in wnids:
                class_dir = folder / w
                if not class_dir.is_dir():
                    absent.append(w)
                    continue
                items += [(f"images/{part}/{w}/{f}", label_of[w]) for f in list_image_names(class_dir)]
            if absent:
                note = (
                    f"imagenet: {len(absent)} of {len(wnids)} classes in classnames.txt have no folder under "
                    f"{folder} (e.g. {', '.join(absent[:3])})"
                )
                warnings.warn(note, stacklevel=2)
                notes.append(note)
            parts[part] = items
        if not parts["train"] or not parts["val"]:
            raise UsageError(
                f"dataset 'imagenet': no images of the classes in classnames.txt under {root / 'images'} "
                f"(expected {self.layout})"
            )
        return ClassificationSource(
            root, [names[w] for w in wnids], self.template, parts["train"], None, parts["val"], notes
        )


def read_classnames(path: Path) -> dict[str, str]:
    """classnames.txt: "<wnid> <class name>" per line -> {wnid: class name}."""
    names: dict[str, str] = {}
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name.strip() or wnid in names:
            raise UsageError(f"{path}:{n}: expected '<wnid> <class name>' with each wnid once, got {line!r}")
        names[wnid] = name.strip()
    if not names:
        raise UsageError(f"{path} lists no classes (expected '<wnid> <class name>' per line)")
    return names


def list_image_names(folder: Path) -> list[str]:
    """Sorted image file names in one folder (hidden files and other extensions skipped)."""
    with os.scandir(folder) as entries:  # one directory read; DirEntry.is_file needs no extra stat call
        return sorted(
            e.name
            for e in entries
            if e.name.lower().endswith(_EXTENSIONS) and not e.name.startswith(".") and e.is_file()
        )

