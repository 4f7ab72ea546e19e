"""Few-shot universal cross-domain retrieval (FS-UCDR, as defined by MAIL; protocols.md).

A query image from a domain (sketch, quickdraw, painting, ...) retrieves gallery images (photos)
of the same class. Methods are trained on seen classes and seen domains with K images per
(seen class, training domain), and evaluated on unseen classes and/or an unseen (held-out)
query domain. Nothing about the method is task-specific: every method is trained with the
task's recipe (MAIL's sampler, CE at temperature 0.07 + hardest-pair triplet, same number of
steps) and evaluated by embedding queries and gallery with `model.encode_image`.

Datasets are registered with `@register_dataset("ucdr", "<id>")` and subclass
:class:`UCDRDataset`; `load(env, options)` returns a :class:`UCDRSource` (what is on disk and
the protocol constants of the dataset). The task does every split itself from that description,
so a dataset only has to list its files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from peftbench.backbone import CROP_SCALE
from peftbench.errors import ConfigError, UsageError
from peftbench.fewshot import draw, sample_fewshot, split_path, write_or_check
from peftbench.registry import get_dataset, register_task
from peftbench.retrieval import RULES, l2_normalize, retrieval_metrics
from peftbench.task import (
    DataEnv,
    DatasetReader,
    ImageList,
    Task,
    TaskData,
    TaskOptions,
    check_files_exist,
    eval_batches,
    files_fingerprint,
    seed_worker,
)

SETTINGS = ("ucdr", "ucdr_mixed", "udcdr", "uccdr")
SIMILARITIES = ("cosine", "euclidean")


# ------------------------------------------------------------------------------ interface
@dataclass
class UCDRSource:
    """What a UCDR dataset provides: its files and its protocol constants.

    Paths are relative to `root`. Class order matters: the seeded per-class draws (the 92%/8%
    split of gallery-domain images, the U^d-CDR subsets) are seeded by a class's index in
    `seen_classes`, as the reference loaders do, so every run and method shares them.

    Two kinds of dataset:
    - multi-domain (DomainNet-like, `held_out_choices` non-empty): one query domain is held out
      per run (never trained on); every other domain trains. Settings: ``ucdr`` (held-out domain,
      unseen classes, gallery = gallery-domain images of unseen classes), ``ucdr_mixed`` (the
      gallery also holds the held-back (1 - gallery_train_fraction) seen-class gallery images),
      ``udcdr`` (held-out domain, first `udcdr_classes` seen classes, a seeded fraction of query
      and gallery images).
    - two-domain (Sketchy / TU-Berlin, `held_out_choices` empty): `query_domain` and
      `gallery_domain` both train on seen classes; setting ``uccdr`` evaluates unseen classes.
    """

    root: Path
    seen_classes: list[str]  # training classes in class-index order (e.g. DomainNet train + val lists)
    unseen_classes: list[str]  # test classes
    domains: list[str]  # every domain that exists on disk
    gallery_domain: str  # photos: "real", "extended_photo", "images"
    # (domain, class) -> relative paths (any order; the task sorts them). A missing key or an empty
    # list means the class is absent from that domain on disk. Classes on disk in no list: leave
    # them out here and name them in `unlisted` (the task warns).
    files: dict[tuple[str, str], list[str]]
    inverted: tuple[str, ...] = ()  # domains the reference loaders colour-invert (faithful default)
    held_out_choices: tuple[str, ...] = ()  # multi-domain: valid held-out query domains; () = two-domain
    query_domain: str | None = None  # two-domain: the query domain (e.g. "sketch", "sketches")
    # multi-domain: held-out domain -> the seen domain whose unused images are the validation queries
    validation_pairs: dict[str, str] = field(default_factory=dict)
    gallery_train_fraction: float | None = 0.92  # multi-domain: share of seen gallery images in training
    udcdr_classes: int = 45  # U^d-CDR: the first N seen classes (ProS/MAIL)
    udcdr_fraction: float = 0.25  # U^d-CDR: share of images per class drawn for query and gallery
    udcdr_fraction_by_domain: dict[str, float] = field(default_factory=dict)  # e.g. {"quickdraw": 0.10}
    map_k: int | None = 200  # mAP@K; None = mAP@all
    prec_k: int = 200  # Prec@K
    template: str = "a photo of a {}."
    train_crop_scale: tuple[float, float] = CROP_SCALE  # random-resized-crop area range (CoOp's default)
    unlisted: list[str] = field(default_factory=list)  # class folders on disk that are in no list
    notes: list[str] = field(default_factory=list)  # recorded in the run (e.g. which class split)

    @property
    def multi_domain(self) -> bool:
        return bool(self.held_out_choices)

    @property
    def settings(self) -> tuple[str, ...]:
        """The evaluation settings this dataset supports, in report order."""
        if not self.multi_domain:
            return ("uccdr",)
        out = ["ucdr"]
        if self.gallery_train_fraction is not None:
            out.append("ucdr_mixed")
        if self.udcdr_classes > 0:
            out.append("udcdr")
        return tuple(out)


@dataclass(frozen=True)
class UCDROptions(TaskOptions):
    """Options of the UCDR task (hashed into the run; `--set task.<name>=value`)."""

    held_out: str = "sketch"  # protocols.md: the held-out query domain, default sketch (DomainNet runs 5)
    settings: tuple[str, ...] = ()  # () = every setting the dataset supports
    similarity: str = "cosine"  # protocols.md: cosine of L2-normalised features (euclidean available)
    invert: tuple[str, ...] | None = None  # domains to colour-invert; None = the dataset's faithful default
    class_split: str = "default"  # sketchy: eccv2018 | random; tuberlin: standard | mail25
    steps: int | None = None  # override the recipe's run length (tests, smoke runs)
    min_steps: int = 100  # task minimum run length when MAIL's epochs at K are shorter (see docs/ucdr.md)
    val_per_class: int = 25  # protocols.md: at most 25 validation queries per class

    def __post_init__(self) -> None:
        from peftbench.config import check

        bad = [s for s in self.settings if s not in SETTINGS]
        check(self, "settings", not bad, f"must be a subset of {', '.join(SETTINGS)}")
        sims = ", ".join(SIMILARITIES)
        check(self, "similarity", self.similarity in SIMILARITIES, f"must be one of {sims}")
        check(self, "steps", self.steps is None or self.steps >= 0, "must be >= 0 or null")
        check(self, "min_steps", self.min_steps >= 0, "must be >= 0")
        check(self, "val_per_class", self.val_per_class >= 1, "must be >= 1")


class UCDRDataset(DatasetReader):
    """Base for UCDR datasets: `load(env, options)` reads the disk layout into a UCDRSource.

    Subclasses set `folder` (under the data root) and `layout` (shown when the root is wrong),
    and implement `load` (and `n_seen_classes`, unless `steps` is fixed). `class_splits` lists
    the accepted `options.class_split` values (the first is what "default" means).
    A generated dataset (the embedded world) may ignore the data root and write its files
    anywhere, as long as `root` / relative path exists.
    """

    name: ClassVar[str] = "?"
    folder: ClassVar[str] = ""
    layout: ClassVar[str] = ""
    class_splits: ClassVar[tuple[str, ...]] = ("default",)
    # The run length (resolved before hashing, so without reading the disk): MAIL's epochs on this
    # dataset, converted to steps at the run's K with `n_seen_classes`; or a fixed number of steps
    # (the embedded world), with the reason recorded.
    mail_epochs: ClassVar[int] = 1
    steps: ClassVar[int | None] = None
    steps_reason: ClassVar[str] = ""
    train_domains: ClassVar[int | None] = None  # training domains per run, if fixed (batch = 12 x this)

    def load(self, env: DataEnv, options: UCDROptions) -> UCDRSource:
        raise NotImplementedError

    def n_seen_classes(self, options: UCDROptions) -> int:
        """Seen (training) classes under `options`, without reading the disk (for the run length)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for readers
    def class_split(self, options: UCDROptions) -> str:
        """The resolved class split (`default` -> the first of `class_splits`), validated."""
        value = self.class_splits[0] if options.class_split == "default" else options.class_split
        if value not in self.class_splits:
            raise UsageError(
                f"task.class_split: dataset {self.name!r} accepts {', '.join(self.class_splits)} "
                f"(got {options.class_split!r})"
            )
        return value

    def require_dirs(self, root: Path, names: list[str]) -> None:
        """Every `root/name` must be a folder, else the expected tree and the path tried."""
        for n in names:
            if not (root / n).is_dir():
                raise UsageError(
                    f"dataset {self.name!r}: {root / n} not found (expected layout: {self.layout})"
                )


def scan_domain(root: Path, domain_dir: str) -> dict[str, list[str]]:
    """class folder -> sorted relative paths of the files in `root/domain_dir/<class>/`.

    Any `name.ext` file counts, as the reference loaders glob `*.*`; hidden files are skipped.
    """
    out: dict[str, list[str]] = {}
    base = root / domain_dir
    with os.scandir(base) as classes:
        for c in classes:
            if not c.is_dir() or c.name.startswith("."):
                continue
            with os.scandir(c.path) as files:
                names = sorted(f.name for f in files if f.is_file() and _is_data_file(f.name))
            out[c.name] = [f"{domain_dir}/{c.name}/{n}" for n in names]
    return out


def _is_data_file(name: str) -> bool:
    """A `name.ext` file that is not hidden (the reference loaders glob `*.*`)."""
    return not name.startswith(".") and "." in name


# ------------------------------------------------------------------------------ recipe constants
TEMPERATURE = 0.07  # protocols.md / MAIL: image-to-text CE at temperature 0.07
TRIPLET_MARGIN = 0.5  # protocols.md / MAIL: hardest-pair triplet, cosine distance, margin 0.5
TRIPLET_WEIGHT = 1.0  # protocols.md: weight 1
CLASSES_PER_DOMAIN = 3  # MAIL FewShotSampler: 3 classes per training domain per step
IMAGES_PER_CLASS = 4  # MAIL FewShotSampler: 4 images per class (shots repeated when K < 4)


# ------------------------------------------------------------------------------ data containers
class UCDRImages(ImageList):
    """(image, class index, domain index) items; `invert[i]` says whether item i is colour-inverted."""


class UCDRVal(UCDRImages):
    """Validation queries (image, seen-class index, domain index), with `.gallery` (the same kind).

    Built only from training classes and training domains, from images not drawn as shots
    (protocols.md, "Validation"); for methods that select or search. Never the test split.
    """

    def __init__(self, *args, gallery: UCDRImages, **kwargs):
        super().__init__(*args, **kwargs)
        self.gallery = gallery


@dataclass
class RetrievalSets:
    """The evaluation sets: named image lists and, per setting, (query set, gallery sets)."""

    images: dict[str, UCDRImages]
    settings: dict[str, tuple[str, tuple[str, ...]]]  # setting -> (query set, gallery sets)


class MAILBatchSampler(Sampler[list[int]]):
    """MAIL's few-shot batch sampler (src/data/sampler.py, FewShotSampler), seeded per epoch.

    Each step takes `classes_per_domain` classes from every training domain and
    `images_per_class` items of each class; a class whose list is shorter repeats it (K < 4:
    each shot appears more than once). Class order within a domain and item order within a class
    are shuffled once per epoch by `random.Random("<seed>|<epoch>|...")`; a domain that runs out of
    classes cycles its order. Steps per epoch = min over domains of (items in the domain) // 12,
    at least 1, as in MAIL.
    """

    def __init__(
        self,
        labels: list[int],
        domains: list[int],
        seed: int,
        classes_per_domain: int = CLASSES_PER_DOMAIN,
        images_per_class: int = IMAGES_PER_CLASS,
    ):
        self.seed = seed
        self.epoch = 0
        self.cpd, self.ipc = classes_per_domain, images_per_class
        groups: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, (c, d) in enumerate(zip(labels, domains, strict=True)):
            groups[d][c].append(i)
        self.groups = {d: dict(sorted(cs.items())) for d, cs in sorted(groups.items())}
        smallest = min(sum(len(v) for v in cs.values()) for cs in self.groups.values())
        self.steps = max(1, smallest // (classes_per_domain * images_per_class))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        rng = random.Random(f"ucdr-sampler|{self.seed}|{self.epoch}")
        order, items, cls_ptr, item_ptr = {}, {}, {}, {}
        for d, cs in self.groups.items():
            order[d] = list(cs)
            rng.shuffle(order[d])
            cls_ptr[d] = 0
            for c, idx in cs.items():
                lst = list(idx)
                rng.shuffle(lst)
                items[d, c] = lst
                item_ptr[d, c] = 0
        for _ in range(self.steps):
            batch: list[int] = []
            for d in self.groups:
                for _ in range(self.cpd):
                    c = order[d][cls_ptr[d] % len(order[d])]
                    cls_ptr[d] += 1
                    lst = items[d, c]
                    for _ in range(self.ipc):
                        batch.append(lst[item_ptr[d, c] % len(lst)])
                        item_ptr[d, c] += 1
            yield batch


def triplet_hardest(
    features: torch.Tensor, labels: torch.Tensor, margin: float = TRIPLET_MARGIN
) -> torch.Tensor:
    """Batch-hard triplet loss on cosine distance (1 - cos) of L2-normalised embeddings.

    For each anchor: the farthest positive (same class, not itself) and the nearest negative;
    loss = mean over anchors with both of relu(d_pos - d_neg + margin). 0 when no anchor has both.
    """
    z = l2_normalize(features)  # (B, E)
    dist = 1 - z @ z.t()  # (B, B)
    same = labels[:, None] == labels[None, :]  # (B, B)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    neg = ~same
    valid = pos.any(1) & neg.any(1)  # (B,)
    if not valid.any():
        return features.sum() * 0.0
    d_pos = dist.masked_fill(~pos, float("-inf")).amax(1)  # (B,)
    d_neg = dist.masked_fill(~neg, float("inf")).amin(1)  # (B,)
    return F.relu(d_pos - d_neg + margin)[valid].mean()


# ------------------------------------------------------------------------------ the task
def metric_names(setting: str, map_k: int | None, prec_k: int) -> tuple[str, str]:
    """`map@200`, `prec@200` for ucdr/uccdr; suffix `_mixed` / `_ud` for ucdr_mixed / udcdr."""
    suffix = {"ucdr": "", "uccdr": "", "ucdr_mixed": "_mixed", "udcdr": "_ud"}[setting]
    return f"map@{'all' if map_k is None else map_k}{suffix}", f"prec@{prec_k}{suffix}"


def _all_metric_names() -> dict[str, str]:
    out = {}
    for setting in SETTINGS:
        for mk, pk in ((200, 200), (None, 100)):
            for name in metric_names(setting, mk, pk):
                out[name] = "higher"
    return out


@register_task("ucdr")
class UCDR(Task):
    """Few-shot UCDR (MAIL, NeurIPS'25; settings of ProS, CVPR'24 and UCDR, ICCV'21).

    Trainable parameters: whatever the method trains; the task owns the data, the training recipe
    (sampler, loss, run length) and the evaluation (mAP@K / Prec@K by `peftbench.retrieval`).
    """

    Options = UCDROptions
    metrics = _all_metric_names()
    primary_metric = "map@200"
    default_dataset = "synth"

    def __init__(self, options: UCDROptions | None = None):
        super().__init__(options)
        self.recipe: dict[str, Any] = {}

    # ------------------------------------------------------------------ recipe
    def resolve_method_config(self, config, ctx):
        """Impose the task's run length on every method; keep its optimiser, lr and weight decay.

        Steps = options.steps if given; else the dataset's fixed steps (embedded world); else
        MAIL's epochs x floor(n_seen x K / 12) (MAIL's steps per epoch at K shots), raised to
        options.min_steps. A method that does not train (epochs or iterations 0) stays untrained.
        Warm-up becomes the same fraction of the run it was of the method's own run.
        """
        opts: UCDROptions = self.options
        ds = get_dataset(self.name, ctx.dataset)()
        own = config.iterations if config.iterations is not None else config.epochs
        if own == 0:
            self.recipe = {"steps": 0, "steps_rule": "the method does not train"}
            return config
        if opts.steps is not None:
            steps, rule = opts.steps, "task option steps"
        elif ds.steps is not None:
            steps, rule = ds.steps, f"dataset {ctx.dataset!r} fixed steps: {ds.steps_reason}"
        else:
            n_seen = ds.n_seen_classes(opts)
            per_epoch = max(1, n_seen * ctx.shots // (CLASSES_PER_DOMAIN * IMAGES_PER_CLASS))
            mail = ds.mail_epochs * per_epoch
            steps = max(mail, opts.min_steps)
            rule = (
                f"MAIL {ds.mail_epochs} epoch(s) x floor({n_seen} classes x {ctx.shots} shots / 12) = {mail}"
                + (f", raised to the task minimum {opts.min_steps}" if mail < opts.min_steps else "")
            )
        # warm-up as a fraction of the method's own run
        frac, warmup_rule = 0.0, "none"
        if config.warmup_iters and config.iterations:
            frac, warmup_rule = config.warmup_iters / config.iterations, "fraction of the method's iterations"
        elif config.warmup_epochs and config.epochs:
            frac, warmup_rule = config.warmup_epochs / config.epochs, "fraction of the method's epochs"
        warmup = int(round(min(frac, 1.0) * steps))
        if not frac and (config.warmup_iters or config.warmup_epochs):
            # the method's run length is in other units than its warm-up: keep a warm-up in steps
            warmup = min(steps, config.warmup_iters or int(round(config.warmup_epochs)))
            warmup_rule = "kept in steps (the method's length and warm-up are in different units)"
        changes: dict[str, Any] = {
            "iterations": steps,
            "epochs": None,
            "warmup_iters": warmup,
            "warmup_epochs": 0.0,
        }
        if ds.train_domains:
            changes["batch_size"] = ds.train_domains * CLASSES_PER_DOMAIN * IMAGES_PER_CLASS
        self.recipe = {
            "steps": steps,
            "steps_rule": rule,
            "warmup_fraction": frac,
            "warmup_steps": warmup,
            "warmup_rule": warmup_rule,
            "method_own_length": {"epochs": config.epochs, "iterations": config.iterations},
            "kept": {
                "optimizer": config.optimizer,
                "lr": config.lr,
                "weight_decay": config.weight_decay,
                "schedule": config.schedule,
            },
        }
        return dataclasses.replace(config, **changes)

    # ------------------------------------------------------------------ data
    def build(self, dataset: str, shots: int, seed: int, backbone, env: DataEnv) -> TaskData:
        opts: UCDROptions = self.options
        reader = get_dataset(self.name, dataset)()
        src = reader.load(env, opts)
        info: dict[str, Any] = {"warnings": [], "notes": list(src.notes)}

        def warn(msg: str) -> None:
            warnings.warn(msg, stacklevel=3)
            info["warnings"].append(msg)

        # --- options against the dataset
        if src.multi_domain:
            if opts.held_out not in src.held_out_choices:
                raise ConfigError(
                    "held_out",
                    f"dataset {dataset!r} accepts the non-gallery domain folders under {src.root}: "
                    f"{', '.join(src.held_out_choices)} (got {opts.held_out!r})",
                )
            query_domain = opts.held_out
            train_domains = [d for d in src.domains if d != opts.held_out]
        else:
            if opts.held_out not in ("sketch", src.query_domain):
                raise ConfigError(
                    "held_out",
                    f"dataset {dataset!r} has no held-out domain (U^c-CDR: queries "
                    f"are {src.query_domain!r} of unseen classes); leave it at its default",
                )
            query_domain = src.query_domain
            train_domains = [src.query_domain, src.gallery_domain]
        settings = opts.settings or src.settings
        bad = [s for s in settings if s not in src.settings]
        if bad:
            raise ConfigError(
                "settings", f"dataset {dataset!r} supports {', '.join(src.settings)} (got {bad})"
            )
        inverted = src.inverted if opts.invert is None else tuple(opts.invert)
        unknown_dom = [d for d in inverted if d not in src.domains]
        if unknown_dom:
            raise ConfigError("invert", f"unknown domain(s) {unknown_dom}; domains: {', '.join(src.domains)}")
        g_dom = src.gallery_domain
        missing_dirs = [d for d in [query_domain, g_dom, *train_domains] if d not in src.domains]
        if missing_dirs:
            raise UsageError(
                f"dataset {dataset!r}: domain folder(s) {missing_dirs} not found under {src.root}"
            )

        files = {k: sorted(v) for k, v in src.files.items() if v}

        def has(d: str, c: str) -> bool:
            return bool(files.get((d, c)))

        # --- classes present on disk
        absent_seen = [c for c in src.seen_classes if not any(has(d, c) for d in train_domains)]
        absent_unseen = [c for c in src.unseen_classes if not (has(query_domain, c) and has(g_dom, c))]
        if absent_seen or absent_unseen:
            warn(
                f"{dataset}: {len(absent_seen)} seen and {len(absent_unseen)} unseen class(es) in the lists "
                f"are absent on disk (e.g. {(absent_seen + absent_unseen)[0]}); running on what is present"
            )
        if len(absent_unseen) == len(src.unseen_classes) and any(
            s in settings for s in ("ucdr", "ucdr_mixed", "uccdr")
        ):
            raise UsageError(
                f"dataset {dataset!r}: none of the {len(src.unseen_classes)} test classes has images in "
                f"both {query_domain!r} and {g_dom!r} under {src.root}"
            )
        if src.unlisted:
            warn(
                f"{dataset}: {len(src.unlisted)} class folder(s) on disk are in no class list, ignored "
                f"(e.g. {src.unlisted[0]})"
            )
        info["classes_absent"] = {"seen": len(absent_seen), "unseen": len(absent_unseen)}
        info["classes_unlisted"] = len(src.unlisted)

        dom_index = {d: i for i, d in enumerate(sorted(src.domains))}
        n_seen = len(src.seen_classes)

        # --- the seeded split of gallery-domain images of seen classes (multi-domain)
        g_train: dict[str, list[str]] = {}
        g_heldback: list[tuple[str, int, int]] = []
        for i, c in enumerate(src.seen_classes):
            paths = files.get((g_dom, c), [])
            if src.multi_domain and src.gallery_train_fraction is not None:
                picked = np.random.RandomState(i).choice(
                    len(paths), int(math.floor(src.gallery_train_fraction * len(paths))), replace=False
                )
                g_train[c] = [paths[j] for j in picked]
                chosen = set(picked.tolist())
                g_heldback += [(paths[j], i, dom_index[g_dom]) for j in range(len(paths)) if j not in chosen]
            else:
                g_train[c] = paths

        # --- the training pool and the few-shot draw: K per (seen class, training domain)
        pool = []
        for d in train_domains:
            for i, c in enumerate(src.seen_classes):
                for p in g_train[c] if d == g_dom else files.get((d, c), []):
                    pool.append((p, i, d))
        if not pool:
            raise UsageError(f"dataset {dataset!r}: no training images of seen classes under {src.root}")
        names = {(i, d): f"{c}|{d}" for i, c in enumerate(src.seen_classes) for d in train_domains}
        split = sample_fewshot(
            dataset,
            shots,
            seed,
            pool,
            None,
            group_of=lambda it: (it[1], it[2]),
            group_names=names,
            strict=env.strict_shots,
        )
        shots_taken = {it[0] for it in split["train"]}

        # --- validation: training classes and domains only, images not drawn as shots
        val_q_dom = src.validation_pairs.get(opts.held_out) if src.multi_domain else query_domain
        if val_q_dom not in train_domains or val_q_dom == g_dom:
            val_q_dom = next(d for d in sorted(train_domains) if d != g_dom)
        val_q, val_g = [], []
        for i, c in enumerate(src.seen_classes):
            rest_q = [(p, i, val_q_dom) for p in files.get((val_q_dom, c), []) if p not in shots_taken]
            val_q += draw(rest_q, opts.val_per_class, f"{dataset}|{shots}|{seed}|{c}|{val_q_dom}|valq")
            val_g += [(p, i, g_dom) for p in g_train[c] if p not in shots_taken]
        split["val"] = [[*it, "query"] for it in val_q] + [[*it, "gallery"] for it in sorted(val_g)]
        split["classnames"] = src.seen_classes
        split["held_out"] = opts.held_out if src.multi_domain else None
        split["gallery_split"] = {
            "fraction": src.gallery_train_fraction if src.multi_domain else None,
            "rule": "per seen class i: paths sorted, np.random.RandomState(i).choice",
        }
        tag = "-".join(x for x in (opts.held_out if src.multi_domain else "", reader.class_split(opts)) if x)
        path = split_path(env.split_dir, self.name, dataset, shots, seed, tag=tag)
        split_sha = write_or_check(path, split)

        # --- test sets per setting
        unseen_label = {c: n_seen + j for j, c in enumerate(src.unseen_classes)}
        sets: dict[str, list[tuple[str, int, int]]] = {}
        plan: dict[str, tuple[str, tuple[str, ...]]] = {}

        def items(d: str, classes: list[str]) -> list[tuple[str, int, int]]:
            return [(p, unseen_label[c], dom_index[d]) for c in classes for p in files.get((d, c), [])]

        present_unseen = [c for c in src.unseen_classes if c not in absent_unseen]
        if any(s in settings for s in ("ucdr", "ucdr_mixed", "uccdr")):
            sets["query_unseen"] = items(query_domain, present_unseen)
            sets["gallery_unseen"] = items(g_dom, present_unseen)
        for s in settings:
            if s in ("ucdr", "uccdr"):
                plan[s] = ("query_unseen", ("gallery_unseen",))
            elif s == "ucdr_mixed":
                sets["gallery_seen_heldback"] = sorted(g_heldback)
                plan[s] = ("query_unseen", ("gallery_unseen", "gallery_seen_heldback"))
            elif s == "udcdr":
                frac = src.udcdr_fraction_by_domain.get(opts.held_out, src.udcdr_fraction)
                q, g = [], []
                for i, c in enumerate(src.seen_classes[: src.udcdr_classes]):
                    for d, out in ((opts.held_out, q), (g_dom, g)):
                        paths = files.get((d, c), [])
                        pick = np.random.RandomState(i).choice(
                            len(paths), int(math.floor(frac * len(paths))), replace=False
                        )
                        out += [(paths[j], i, dom_index[d]) for j in pick]
                if not q or not g:
                    raise UsageError(
                        f"dataset {dataset!r}: U^d-CDR has no images ({len(q)} queries, {len(g)} "
                        f"gallery) among the first {src.udcdr_classes} seen classes"
                    )
                sets["query_ud"], sets["gallery_ud"] = q, g
                info["udcdr_fraction"] = frac
                plan[s] = ("query_ud", ("gallery_ud",))
        for name in list(sets):
            if name.startswith("query") and not sets[name]:
                raise UsageError(f"dataset {dataset!r}: the {name} set is empty")

        train_items = [tuple(it) for it in split["train"]]
        val_q_items = [tuple(it[:3]) for it in split["val"] if it[3] == "query"]
        val_g_items = [tuple(it[:3]) for it in split["val"] if it[3] == "gallery"]
        every = [it[0] for it in train_items] + [it[0] for it in val_q_items + val_g_items]
        every += [it[0] for s in sets.values() for it in s]
        check_files_exist(src.root, every, dataset)

        inv = set(inverted)

        def images(its, transform, cls=UCDRImages, **kw):
            its = [(p, c, dom_index[d] if isinstance(d, str) else d) for p, c, d in its]
            inv_flags = [sorted(src.domains)[d] in inv for _, _, d in its]
            return cls(src.root, its, transform, invert=inv_flags, skip_corrupt=env.skip_corrupt, **kw)

        train = images(train_items, backbone.make_train_transform(src.train_crop_scale))
        info["train_crop_scale"] = list(src.train_crop_scale)
        val = images(
            val_q_items,
            backbone.eval_transform,
            UCDRVal,
            gallery=images(val_g_items, backbone.eval_transform),
        )
        test = RetrievalSets({k: images(v, backbone.eval_transform) for k, v in sets.items()}, plan)

        info.update(
            {
                "held_out": opts.held_out if src.multi_domain else None,
                "query_domain": query_domain,
                "gallery_domain": g_dom,
                "train_domains": train_domains,
                "validation_query_domain": val_q_dom,
                "settings": list(settings),
                "similarity": opts.similarity,
                "inverted_domains": sorted(inv),
                "inversion_default": opts.invert is None,
                "class_split": reader.class_split(opts),
                "metric_k": {"map": src.map_k if src.map_k is not None else "all", "prec": src.prec_k},
                "retrieval_rules": RULES,
                "recipe": {
                    **self.recipe,
                    "sampler": f"MAIL: {CLASSES_PER_DOMAIN} classes per training domain "
                    f"x {IMAGES_PER_CLASS} images "
                    "per class per step, shots repeated when K < 4, seeded per epoch",
                    "batch_size": len(train_domains) * CLASSES_PER_DOMAIN * IMAGES_PER_CLASS,
                    "loss": f"CE(class_scores / {TEMPERATURE}) over seen-class prompts "
                    f"+ {TRIPLET_WEIGHT} x hardest-pair "
                    f"triplet (cosine distance, margin {TRIPLET_MARGIN})",
                    "evaluated": "last iterate",
                },
                "split_order_note": "paths are sorted before every seeded draw: deterministic, "
                "but not the reference's "
                "glob (directory-listing) order, so the exact files differ from ProS/MAIL",
            }
        )
        counts = {k: len(v) for k, v in sets.items()}
        return TaskData(
            classnames=src.seen_classes,
            template=src.template,
            train=train,
            val=val,
            test=test,
            fingerprint={
                "split_file": str(path),
                "split_sha256": split_sha,
                "files_sha256": files_fingerprint(every),
                "n_train": len(train_items),
                "n_val_queries": len(val_q_items),
                "n_val_gallery": len(val_g_items),
                "test_sets": counts,
                "n_seen_classes": n_seen,
                "n_unseen_classes": len(present_unseen),
                "short_groups": split["short_groups"],
            },
            info=info,
        )

    def train_loader(self, data: TaskData, batch_size: int, seed: int, env: DataEnv) -> DataLoader:
        """MAIL's sampler; `batch_size` is ignored (the batch is 12 x training domains)."""
        items = data.train.items
        sampler = MAILBatchSampler([it[1] for it in items], [it[2] for it in items], seed)
        return DataLoader(
            data.train, batch_sampler=sampler, num_workers=env.workers, worker_init_fn=seed_worker
        )

    def loss(self, model, batch) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        feats = model.encode_image(images)  # (B, E)
        ce = F.cross_entropy(model.class_scores(feats, images) / TEMPERATURE, labels)
        return ce + TRIPLET_WEIGHT * triplet_hardest(feats, labels)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, data: TaskData, env: DataEnv) -> dict[str, float]:
        opts: UCDROptions = self.options
        sets: RetrievalSets = data.test
        needed = sorted({name for q, gs in sets.settings.values() for name in (q, *gs)})
        # Each image is embedded once, even when it sits in several sets (the U^d-CDR gallery
        # overlaps the held-back seen gallery).
        row: dict[str, int] = {}
        items, flags = [], []
        for name in needed:
            ds = sets.images[name]
            for it, inv in zip(ds.items, ds.invert, strict=True):
                if it[0] not in row:
                    row[it[0]] = len(items)
                    items.append(it)
                    flags.append(inv)
        first = sets.images[needed[0]]
        union = UCDRImages(first.root, items, first.transform, invert=flags, skip_corrupt=first.skip_corrupt)
        all_feats, _ = embed(model, union, env)  # (U, E)
        feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in needed:
            ds = sets.images[name]
            idx = torch.tensor([row[it[0]] for it in ds.items], dtype=torch.long)
            feats[name] = (all_feats[idx], torch.tensor([it[1] for it in ds.items], dtype=torch.long))
        n_images = len(union)
        mk, pk = data.info["metric_k"]["map"], data.info["metric_k"]["prec"]
        map_k = None if mk == "all" else int(mk)
        out: dict[str, float] = {}
        caps = {}
        for setting, (q, gs) in sets.settings.items():
            gf = torch.cat([feats[g][0] for g in gs])
            gl = torch.cat([feats[g][1] for g in gs])
            r = retrieval_metrics(
                feats[q][0], feats[q][1], gf, gl, map_k=map_k, prec_k=pk, kind=opts.similarity
            )
            m_name, p_name = metric_names(setting, map_k, pk)
            out[m_name], out[p_name] = r.map, r.prec
            caps[setting] = {
                "map_k": r.map_k,
                "prec_k": r.prec_k,
                "k_capped": r.k_capped,
                "n_queries": r.n_queries,
                "n_gallery": r.n_gallery,
            }
        data.info["evaluation"] = caps
        corrupt = len(union.corrupt)
        if corrupt:
            data.info["corrupt_skipped"] = corrupt
        out["_n_images"] = n_images
        return out


def embed(model, images: UCDRImages, env: DataEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) float32 features (on CPU) and (N,) labels, in batches with env.workers loaders."""
    loader = DataLoader(images, batch_size=env.eval_batch_size, num_workers=env.workers)
    feats, labels = [], []
    for batch in eval_batches(loader, env, f"embed ({len(images)} images)"):
        x = batch[0].to(env.device)
        feats.append(model.encode_image(x).float().cpu())  # (B, E)
        labels.append(batch[1])
    return torch.cat(feats), torch.cat(labels)
