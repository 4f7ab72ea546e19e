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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from peftbench.errors import UsageError
from peftbench.task import DataEnv, TaskOptions

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


class UCDRDataset:
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
