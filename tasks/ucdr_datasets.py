"""UCDR readers for DomainNet, Sketchy (extended) and TU-Berlin (extended), in the layouts of the
ProS / UCDR / MAIL loaders (data/ucdr_splits/README.md, section 3). The class lists ship with the
package (`tasks/ucdr_splits/*.txt`, extracted from those repositories).

    <data-root>/DomainNet/<domain>/<class>/<image>   (clipart infograph painting quickdraw real sketch)
    <data-root>/Sketchy/sketch/<class>/<file>               + Sketchy/extended_photo/<class>/<file>
    <data-root>/TUBerlin/sketches/<class>/<file>            + TUBerlin/images/<class>/<file>
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from peftbench.errors import UsageError
from peftbench.registry import register_dataset
from peftbench.task import DataEnv
from peftbench.tasks.ucdr import UCDRDataset, UCDROptions, UCDRSource, scan_domain

SPLITS_DIR = Path(__file__).parent / "ucdr_splits"


@cache
def _read(name: str) -> tuple[str, ...]:
    path = SPLITS_DIR / f"{name}.txt"
    if not path.is_file():
        raise UsageError(f"class list {path} is missing from the installed package (reinstall peftbench)")
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def read_class_list(name: str) -> list[str]:
    """A shipped class list by file stem, e.g. `domainnet_trainval_classes` (one class per line)."""
    return list(_read(name))


def _collect(root: Path, domain_dirs: dict[str, str], listed: set[str]):
    """(domain, class) -> files for listed classes, and the sorted unlisted class folders."""
    files: dict[tuple[str, str], list[str]] = {}
    unlisted: set[str] = set()
    for domain, sub in domain_dirs.items():
        for c, paths in scan_domain(root, sub).items():
            if c in listed:
                files[domain, c] = paths
            else:
                unlisted.add(c)
    return files, sorted(unlisted)


@register_dataset("ucdr", "domainnet")
class DomainNet(UCDRDataset):
    """DomainNet (Peng et al., ICCV'19) with the UCDR class split (Paul et al., ICCV'21).

    300 seen classes (245 train + 55 val, merged as ProS/MAIL do, in that order), 45 unseen.
    Every sub-folder of DomainNet/ is a domain; `real` is the gallery; one of the other domains
    is held out per run. Sketch and quickdraw are colour-inverted by default (reference loaders).
    """

    folder = "DomainNet"
    layout = "<data-root>/DomainNet/{clipart,infograph,painting,quickdraw,real,sketch}/<class>/<image>"
    mail_epochs = 1  # MAIL run scripts: 1 epoch on DomainNet
    train_domains = 5  # six domains minus the held-out one (MAIL: -bs 60 = 5 x 12)
    gallery = "real"
    # protocols.md: validation queries come from the seen domain the reference pairs with the held-out one
    pairs = {
        "sketch": "quickdraw",
        "quickdraw": "sketch",
        "painting": "infograph",
        "infograph": "painting",
        "clipart": "painting",
    }

    def n_seen_classes(self, options: UCDROptions) -> int:
        return len(read_class_list("domainnet_trainval_classes"))

    def load(self, env: DataEnv, options: UCDROptions) -> UCDRSource:
        root = self.root(env)
        self.class_split(options)
        domains = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.require_dirs(root, [self.gallery])
        seen = read_class_list("domainnet_trainval_classes")
        unseen = read_class_list("domainnet_test_classes")
        files, unlisted = _collect(root, {d: d for d in domains}, set(seen) | set(unseen))
        return UCDRSource(
            root=root,
            seen_classes=seen,
            unseen_classes=unseen,
            domains=domains,
            gallery_domain=self.gallery,
            files=files,
            inverted=tuple(d for d in ("sketch", "quickdraw") if d in domains),  # reference loaders
            held_out_choices=tuple(d for d in domains if d != self.gallery),
            validation_pairs=dict(self.pairs),
            gallery_train_fraction=0.92,  # ProS/MAIL: 92% of real seen-class images train
            udcdr_classes=45,  # ProS/MAIL: first 45 seen classes
            udcdr_fraction=0.25,  # ProS/MAIL: 25% of images...
            udcdr_fraction_by_domain={"quickdraw": 0.10},  # ...10% for quickdraw
            map_k=200,
            prec_k=200,
            unlisted=unlisted,
            notes=["DomainNet: official per-image train/test lists are ignored, as in ProS/UCDR/MAIL"],
        )


@register_dataset("ucdr", "sketchy")
class Sketchy(UCDRDataset):
    """Sketchy-extended (Sangkloy et al., SIGGRAPH'16; Liu et al., CVPR'17 photos), U^c-CDR.

    Sketches (`sketch/`, inverted by default) query extended photos (`extended_photo/`).
    Test classes: the 21 ECCV'18 classes (default) or the 25 random-split classes.
    """

    folder = "Sketchy"
    layout = "<data-root>/Sketchy/{sketch,extended_photo}/<class>/<file>"
    class_splits = ("eccv2018", "random")
    mail_epochs = 20  # MAIL run scripts: 20 epochs on Sketchy
    train_domains = 2

    def n_seen_classes(self, options: UCDROptions) -> int:
        return len(read_class_list(f"sketchy_train_classes_{self.class_split(options)}"))

    def load(self, env: DataEnv, options: UCDROptions) -> UCDRSource:
        root = self.root(env)
        split = self.class_split(options)
        self.require_dirs(root, ["sketch", "extended_photo"])
        if (root / "sketch" / "tx_000000000000").is_dir():
            raise UsageError(
                f"dataset 'sketchy': {root / 'sketch' / 'tx_000000000000'} must be flattened: move its class "
                f"folders up into {root / 'sketch'} (expected layout: {self.layout})"
            )
        seen = read_class_list(f"sketchy_train_classes_{split}")
        unseen = read_class_list(f"sketchy_test_classes_{split}")
        files, unlisted = _collect(
            root, {"sketch": "sketch", "extended_photo": "extended_photo"}, set(seen) | set(unseen)
        )
        eccv = split == "eccv2018"
        return UCDRSource(
            root=root,
            seen_classes=seen,
            unseen_classes=unseen,
            domains=["extended_photo", "sketch"],
            gallery_domain="extended_photo",
            files=files,
            inverted=("sketch",),  # reference loaders invert the domain named exactly "sketch"
            query_domain="sketch",
            map_k=200 if eccv else None,  # ECCV'18 split: mAP@200 / Prec@200; random: mAP@all / Prec@100
            prec_k=200 if eccv else 100,
            unlisted=unlisted,
            notes=[f"Sketchy class split {split}"],
        )


@register_dataset("ucdr", "tuberlin")
class TUBerlin(UCDRDataset):
    """TU-Berlin-extended (Eitz et al., SIGGRAPH'12; Zhang et al., ECCV'16 images), U^c-CDR.

    Sketches (`sketches/`) query images (`images/`); 30 test classes (or MAIL's 25-class list).
    Sketches are NOT inverted by default: the reference loaders only invert a domain named exactly
    "sketch", and this domain is "sketches" (a quirk kept for faithfulness; `invert=sketches`).
    """

    folder = "TUBerlin"
    layout = "<data-root>/TUBerlin/{sketches,images}/<class>/<file>"
    class_splits = ("standard", "mail25")
    mail_epochs = 20  # MAIL run scripts: 20 epochs on TU-Berlin
    train_domains = 2

    def _classes(self, options: UCDROptions) -> tuple[list[str], list[str]]:
        if self.class_split(options) == "standard":
            return read_class_list("tuberlin_trainval_classes"), read_class_list("tuberlin_test_classes")
        # MAIL's 25-class test list: training = all - test - val (sorted), then val appended.
        test = read_class_list("tuberlin_test_classes_mail25")
        val = read_class_list("tuberlin_val_classes")
        rest = sorted(set(read_class_list("tuberlin_all_classes")) - set(test) - set(val))
        return rest + val, test

    def n_seen_classes(self, options: UCDROptions) -> int:
        return len(self._classes(options)[0])

    def load(self, env: DataEnv, options: UCDROptions) -> UCDRSource:
        root = self.root(env)
        self.require_dirs(root, ["sketches", "images"])
        seen, unseen = self._classes(options)
        files, unlisted = _collect(
            root, {"sketches": "sketches", "images": "images"}, set(seen) | set(unseen)
        )
        return UCDRSource(
            root=root,
            seen_classes=seen,
            unseen_classes=unseen,
            domains=["images", "sketches"],
            gallery_domain="images",
            files=files,
            inverted=(),  # faithful to the reference quirk (see class docstring)
            query_domain="sketches",
            map_k=None,  # mAP@all / Prec@100
            prec_k=100,
            unlisted=unlisted,
            notes=[f"TU-Berlin class split {self.class_split(options)}"],
        )
