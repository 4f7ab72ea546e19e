"""CoOp's 11 classification datasets (tasks/coop_datasets.py) and `peftbench splits`.

Every test writes a tiny fake dataset in the exact on-disk layout of CoOp's DATASETS.md (real
JPEG files, 3 classes, a few images each) and goes through the same code a run takes.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, TINY, make_image
from torch import nn
from typer.testing import CliRunner

from peftbench.cli import app
from peftbench.config import MethodConfig
from peftbench.errors import UsageError
from peftbench.method import Method
from peftbench.registry import METHODS, get_dataset, load_plugins, register_method
from peftbench.results import ResultStore
from peftbench.runner import RunSpec, execute
from peftbench.task import DataEnv, sha256_text
from peftbench.tasks.classification import Classification

load_plugins()

CLASSES = ["alpha_one", "beta", "gamma"]  # an underscore, as in CoOp's class names
N_TRAIN, N_VAL, N_TEST = 4, 2, 2  # images per class in each part of the fake split files

# Exactly the templates of protocols.md (the spec, restated here so that a change is caught).
TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
}


def _cars(c: int, name: str, part: str, i: int) -> str:
    return f"{'cars_test' if part == 'test' else 'cars_train'}/{c * 100 + i:05d}.jpg"


# id -> (CoOp folder, image folder, split file, relative path of image i of class c in a part)
ZHOU = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   lambda c, n, part, i: f"{n}/image_{part}{i:04d}.jpg"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                    lambda c, n, part, i: f"{n}_{part}{i}.jpg"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", _cars),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                       lambda c, n, part, i: f"image_{c}{part}{i:04d}.jpg"),
    "food101": ("food-101", "images", "split_zhou_Food101.json", lambda c, n, part, i: f"{n}/{part}{i}.jpg"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json",
               lambda c, n, part, i: f"{n[0]}/{n}/sun_{part}{i}.jpg"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json",
            lambda c, n, part, i: f"{n}/{n}_{part}{i:04d}.jpg"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json",
                lambda c, n, part, i: f"{n.title()}/{n.title()}_{part}{i}.jpg"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
               lambda c, n, part, i: f"{n}/v_{n}_{part}{i}.jpg"),
}
FGVC_VARIANTS = ["707-320", "Boeing 717", "DHC-1"]  # real variant names: spaces and hyphens
IMAGENET = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
ALL_IDS = sorted([*ZHOU, "fgvc_aircraft", "imagenet"])


def save_jpeg(path: Path, colour_index: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(COLOURS[colour_index % len(COLOURS)], seed, size=24).save(path, format="JPEG")


def write_zhou(data_root: Path, dataset: str) -> Path:
    """CoOp's layout: <folder>/<image dir>/... and <folder>/split_zhou_<Name>.json."""
    folder, image_dir, split_file, rel = ZHOU[dataset]
    root = data_root / folder
    image_root = root / image_dir if image_dir else root
    if dataset == "stanford_cars":
        for d in ("cars_train", "cars_test", "devkit"):
            (root / d).mkdir(parents=True, exist_ok=True)
    split = {}
    for part, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        split[part] = []
        for c, name in enumerate(CLASSES):
            for i in range(n):
                path = rel(c, name, part, i)
                save_jpeg(image_root / path, c, c * 100 + {"train": 0, "val": 10, "test": 20}[part] + i)
                split[part].append([path, c, name])
    (root / split_file).write_text(json.dumps(split))
    return root


def write_fgvc(data_root: Path) -> Path:
    """fgvc-aircraft-2013b/data renamed fgvc_aircraft/: images/<id>.jpg and the variant lists."""
    root = data_root / "fgvc_aircraft"
    (root / "variants.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "variants.txt").write_text("\n".join(FGVC_VARIANTS) + "\n")
    image_id = 1000000
    for part, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        lines = []
        for c, variant in enumerate(FGVC_VARIANTS):
            for _ in range(n):
                image_id += 1
                save_jpeg(root / "images" / f"{image_id}.jpg", c, image_id)
                lines.append(f"{image_id} {variant}")
        (root / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_imagenet(data_root: Path, n_train: int = 5, n_val: int = 2) -> Path:
    """imagenet/images/{train,val}/<wnid>/*.JPEG and imagenet/classnames.txt."""
    root = data_root / "imagenet"
    for c, wnid in enumerate(sorted(IMAGENET)):
        for part, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                save_jpeg(root / "images" / part / wnid / f"{wnid}_{part}{i}.JPEG", c, c * 50 + i)
    (root / "classnames.txt").write_text("".join(f"{w} {name}\n" for w, name in IMAGENET.items()))
    return root


def write_dataset(data_root: Path, dataset: str) -> Path:
    if dataset == "fgvc_aircraft":
        return write_fgvc(data_root)
    if dataset == "imagenet":
        return write_imagenet(data_root)
    return write_zhou(data_root, dataset)


def env_for(tmp_path: Path, **kw) -> DataEnv:
    return DataEnv(data_root=tmp_path / "data", split_dir=tmp_path / "splits", **kw)


def spec(dataset: str, method: str = "zeroshot", shots: int = 2, seed: int = 1) -> RunSpec:
    return RunSpec(method=method, task="classification", dataset=dataset, backbone=TINY, pretrained=None,
                   shots=shots, seed=seed)


# ------------------------------------------------------------------------------ a method that trains
@dataclass(frozen=True)
class ShiftConfig(MethodConfig):
    epochs: int | None = 1  # test-only: one pass over the few-shot set
    batch_size: int = 4  # test-only: a few steps on 3 classes x 2 shots
    lr: float = 0.5  # test-only: large enough that one step visibly moves the shift


class Shift(Method):
    """Test-only method: a learned vector added to the image embedding. Trainable: that (E,) vector."""

    Config = ShiftConfig
    tasks = ("classification",)

    def __init__(self, backbone, classnames, config=None, template="a photo of a {}."):
        super().__init__(backbone, classnames, config, template=template)
        self.shift = nn.Parameter(torch.zeros(backbone.info.embed_dim))  # (E,)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return super().encode_image(images) + self.shift  # (B, E)


@pytest.fixture
def shift_method():
    """Registered for one test only, so registry-wide tests elsewhere never see it."""
    name = "_test_coop_shift"
    register_method(name)(Shift)
    yield name
    METHODS.pop(name, None)


# ------------------------------------------------------------------------------ every reader
@pytest.mark.parametrize("dataset", ALL_IDS)
def test_reader_end_to_end(tmp_path, dataset):
    """Read the layout, draw and write the split, evaluate zero-shot, and record it."""
    write_dataset(tmp_path / "data", dataset)
    env = env_for(tmp_path)
    source = get_dataset("classification", dataset)().load(env)
    expected = {"fgvc_aircraft": FGVC_VARIANTS, "imagenet": [IMAGENET[w] for w in sorted(IMAGENET)]}
    assert source.classnames == expected.get(dataset, CLASSES)
    assert source.template == TEMPLATES[dataset]
    n_test = 2 if dataset == "imagenet" else N_TEST
    assert len(source.test) == 3 * n_test
    assert sorted({label for _, label in source.train}) == [0, 1, 2]
    assert all((source.root / p).is_file() for p, _ in source.train + source.test + (source.val or []))

    store = ResultStore(tmp_path / "results")
    outcome = execute(spec(dataset), store, env, progress=False)
    rec = outcome.record
    assert outcome.status == "ok", rec.get("error")
    assert 0.0 <= rec["metrics"]["acc"]["value"] <= 100.0
    assert rec["timing"]["eval_images"] == 3 * n_test
    assert rec["data"]["n_train"] == 3 * 2 and rec["data"]["n_val"] == 3 * 2  # K=2, min(K, 4)=2 per class
    split_file = Path(rec["data"]["split_file"])
    assert split_file == tmp_path / "splits" / "classification" / dataset / "shots2_seed1.json"
    split = json.loads(split_file.read_text())
    assert rec["data"]["split_sha256"] == sha256_text(split_file.read_text())
    listed = [p for p, *_ in split["train"] + split["val"]]
    assert all(not Path(p).is_absolute() and (source.root / p).is_file() for p in listed)
    assert split["classnames"] == source.classnames
    assert rec["task_info"]["notes"]  # where the split came from is recorded


@pytest.mark.parametrize("dataset", ["dtd", "fgvc_aircraft", "imagenet"])
def test_training_step_on_each_kind_of_reader(tmp_path, dataset, shift_method):
    """A trainable method takes optimiser steps on the few-shot split and is evaluated."""
    write_dataset(tmp_path / "data", dataset)
    store = ResultStore(tmp_path / "results")
    outcome = execute(spec(dataset, method=shift_method), store, env_for(tmp_path), progress=False)
    rec = outcome.record
    assert outcome.status == "ok", rec.get("error")
    assert rec["params"]["trainable"] == 32  # the tiny backbone's embed_dim
    assert rec["train"]["steps"] == 2  # 6 shots, batch 4, one epoch
    state = ResultStore(tmp_path / "results")
    assert state.latest(outcome.config_hash)["status"] == "ok"


def test_templates_reach_the_method(tmp_path):
    """The task hands the dataset's template to the method, which builds its prompts from it."""
    write_dataset(tmp_path / "data", "dtd")
    data = Classification().build("dtd", 1, 1, _Transforms(), env_for(tmp_path))
    assert data.template == "{} texture."
    from peftbench.runner import get_backbone

    model = METHODS["zeroshot"](get_backbone(TINY, None, torch.device("cpu")).copy(), data.classnames,
                                template=data.template)
    assert model.prompts() == ["alpha one texture.", "beta texture.", "gamma texture."]


from peftbench.splits import _TransformsOnly as _Transforms  # noqa: E402  (a transforms-only backbone)


# ------------------------------------------------------------------------------ ImageNet / FGVC specifics
def test_imagenet_validation_comes_from_unused_training_images(tmp_path):
    write_imagenet(tmp_path / "data", n_train=6, n_val=2)
    env = env_for(tmp_path)
    source = get_dataset("classification", "imagenet")().load(env)
    assert source.val is None  # no val split: drawn from training images
    assert all(p.startswith("images/val/") for p, _ in source.test)
    for shots, n_val in ((1, 1), (2, 2), (4, 2)):  # 6 training images: 4 shots leave 2 for validation
        data = Classification().build("imagenet", shots, 1, _Transforms(), env)
        train, val = data.train.items, data.val.items
        assert all(p.startswith("images/train/") for p, _ in train + val)
        assert not {p for p, _ in train} & {p for p, _ in val}
        for label in range(3):
            assert sum(lab == label for _, lab in train) == shots
            assert sum(lab == label for _, lab in val) == min(n_val, 4)
    # labels follow the sorted wnids, names come from classnames.txt
    assert source.classnames == ["tench", "goldfish", "great white shark"]
    assert {p.split("/")[2] for p, lab in source.train if lab == 2} == {"n01484850"}


def test_imagenet_unlisted_and_absent_class_folders_warn(tmp_path):
    root = write_imagenet(tmp_path / "data")
    save_jpeg(root / "images" / "train" / "n09999999" / "x.JPEG", 0, 1)
    import shutil

    shutil.rmtree(root / "images" / "val" / "n01443537")
    with pytest.warns(UserWarning) as caught:
        source = get_dataset("classification", "imagenet")().load(env_for(tmp_path))
    messages = [str(w.message) for w in caught]
    assert any("1 class folder(s)" in m and "n09999999" in m for m in messages)
    assert any("1 of 3 classes" in m and "n01443537" in m for m in messages)
    assert not any("n09999999" in p for p, _ in source.train)
    assert len(source.test) == 2 * 2


def test_zhou_unlisted_class_folder_warns_but_caltech_background_does_not(tmp_path):
    root = write_zhou(tmp_path / "data", "caltech101")
    save_jpeg(root / "101_ObjectCategories" / "BACKGROUND_Google" / "x.jpg", 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_dataset("classification", "caltech101")().load(env_for(tmp_path))  # CoOp ignores it too
    save_jpeg(root / "101_ObjectCategories" / "zebra" / "x.jpg", 0, 1)
    with pytest.warns(UserWarning, match="zebra"):
        get_dataset("classification", "caltech101")().load(env_for(tmp_path))


def test_fgvc_variant_files(tmp_path):
    root = write_fgvc(tmp_path / "data")
    source = get_dataset("classification", "fgvc_aircraft")().load(env_for(tmp_path))
    assert source.root == root / "images"
    lines = (root / "images_variant_test.txt").read_text().splitlines()
    image_id, variant = lines[-1].split(" ", 1)
    assert variant == "DHC-1" and source.test[-1] == (f"{image_id}.jpg", 2)
    assert [lab for _, lab in source.train].count(1) == N_TRAIN  # "Boeing 717" has a space in its name
    assert len(source.val) == 3 * N_VAL
    with open(root / "images_variant_val.txt", "a") as f:
        f.write("1234567 Concorde\n")
    with pytest.raises(UsageError, match=r"images_variant_val.txt:7: variant 'Concorde' is not in variants"):
        get_dataset("classification", "fgvc_aircraft")().load(env_for(tmp_path))


# ------------------------------------------------------------------------------ bad input
def test_missing_listed_files_one_error_with_count_and_paths(tmp_path):
    root = write_zhou(tmp_path / "data", "dtd")
    split = json.loads((root / "split_zhou_DescribableTextures.json").read_text())
    gone = [split["test"][0][0], split["test"][3][0]]
    for p in gone:
        (root / "images" / p).unlink()
    with pytest.raises(UsageError) as e:
        execute(spec("dtd"), ResultStore(tmp_path / "results"), env_for(tmp_path), progress=False)
    msg = str(e.value)
    assert "2 file(s)" in msg and gone[0] in msg and gone[1] in msg and "\n" not in msg
    assert not ResultStore(tmp_path / "results").records()  # bad input writes no record


@pytest.mark.parametrize(
    "dataset, remove, tried",
    [
        ("dtd", None, "dtd"),
        ("dtd", "split_zhou_DescribableTextures.json", "dtd/split_zhou_DescribableTextures.json"),
        ("stanford_cars", "cars_test", "stanford_cars/cars_test"),
        ("fgvc_aircraft", "variants.txt", "fgvc_aircraft/variants.txt"),
        ("imagenet", "classnames.txt", "imagenet/classnames.txt"),
        ("imagenet", "images/val", "imagenet/images/val"),
    ],
)
def test_wrong_layout_names_expected_tree_and_path_tried(tmp_path, dataset, remove, tried):
    import shutil

    (tmp_path / "data").mkdir()
    if remove is not None:
        root = write_dataset(tmp_path / "data", dataset)
        target = root / remove
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UsageError) as e:
        get_dataset("classification", dataset)().load(env_for(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "data" / tried) in msg  # the path tried
    folder = {"dtd": "dtd", "stanford_cars": "stanford_cars", "fgvc_aircraft": "fgvc_aircraft",
              "imagenet": "imagenet"}[dataset]
    assert f"<data-root>/{folder}/{{" in msg  # the expected tree
    assert "\n" not in msg


def test_no_data_root_says_how_to_give_one(tmp_path):
    with pytest.raises(UsageError, match="--data-root DIR or set PEFTBENCH_DATA"):
        get_dataset("classification", "eurosat")().load(DataEnv(data_root=None))


def test_corrupt_split_json_is_one_clear_error(tmp_path):
    root = write_zhou(tmp_path / "data", "eurosat")
    bad = {"train": [["a.jpg", 0]], "val": [], "test": []}
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(bad))
    with pytest.raises(UsageError, match=r"train\[0\].*is not \[relative_path, label, classname\]"):
        get_dataset("classification", "eurosat")().load(env_for(tmp_path))


def test_corrupt_image_error_names_the_file_or_is_skipped_and_counted(tmp_path):
    root = write_zhou(tmp_path / "data", "oxford_pets")
    split = json.loads((root / "split_zhou_OxfordPets.json").read_text())
    bad = split["test"][1][0]
    (root / "images" / bad).write_bytes(b"not a jpeg at all")
    with pytest.raises(UsageError, match=bad) as e:
        execute(spec("oxford_pets"), ResultStore(tmp_path / "r1"), env_for(tmp_path), progress=False)
    assert "--skip-corrupt" in str(e.value)
    outcome = execute(spec("oxford_pets"), ResultStore(tmp_path / "r2"), env_for(tmp_path, skip_corrupt=True),
                      progress=False)
    assert outcome.status == "ok"
    stored = ResultStore(tmp_path / "r2").latest(outcome.config_hash)
    assert stored["task_info"]["corrupt_skipped"] == 1


def test_corrupt_training_image_fails_the_run_with_its_name(tmp_path, shift_method):
    root = write_zhou(tmp_path / "data", "food101")
    split = json.loads((root / "split_zhou_Food101.json").read_text())
    bad = split["train"][0][0]
    (root / "images" / bad).write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(UsageError, match=bad):  # K=4 = every training image, so the bad one is drawn
        execute(spec("food101", method=shift_method, shots=N_TRAIN), ResultStore(tmp_path / "r"),
                env_for(tmp_path), progress=False)


# ------------------------------------------------------------------------------ peftbench splits
def invoke(*args: str):
    return CliRunner().invoke(app, ["splits", *args])


def test_splits_write_then_a_run_reuses_the_same_file(tmp_path):
    write_zhou(tmp_path / "data", "ucf101")
    common = ["--dataset", "ucf101", "--shots", "1,2", "--seeds", "1,2",
              "--data-root", str(tmp_path / "data"), "--split-dir", str(tmp_path / "splits")]
    result = invoke("write", *common)
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "splits" / "classification" / "ucf101").glob("*.json"))
    assert [f.name for f in files] == ["shots1_seed1.json", "shots1_seed2.json", "shots2_seed1.json",
                                       "shots2_seed2.json"]
    assert result.output.count("written") == 4
    text = (files[2]).read_text()
    again = invoke("write", *common)
    assert again.exit_code == 0 and again.output.count("present") == 4
    assert files[2].read_text() == text

    outcome = execute(spec("ucf101", shots=2, seed=1), ResultStore(tmp_path / "results"), env_for(tmp_path),
                      progress=False)
    assert outcome.status == "ok"
    assert outcome.record["data"]["split_sha256"] == sha256_text(text)  # the run reused the written file
    assert files[2].read_text() == text

    checked = invoke("check", *common)
    assert checked.exit_code == 0, checked.output
    assert checked.output.count(" ok:") == 4


def test_splits_check_reports_problems_with_counts(tmp_path):
    root = write_zhou(tmp_path / "data", "dtd")
    common = ["--dataset", "dtd", "--shots", "1,2", "--seeds", "1", "--data-root", str(tmp_path / "data"),
              "--split-dir", str(tmp_path / "splits")]
    assert invoke("write", *common).exit_code == 0
    folder = tmp_path / "splits" / "classification" / "dtd"

    # an edited file: one training entry swapped for an image that was not drawn
    edited = json.loads((folder / "shots2_seed1.json").read_text())
    drawn = {p for p, *_ in edited["train"]}
    other = next(p for p in sorted((root / "images" / "beta").iterdir())
                 if f"beta/{p.name}" not in drawn and "train" in p.name)
    edited["train"][-1] = [f"beta/{other.name}", 1]
    (folder / "shots2_seed1.json").write_text(json.dumps(edited))
    # a missing file
    (folder / "shots1_seed1.json").unlink()
    result = invoke("check", *common)
    assert result.exit_code == 1
    assert "1 entr(y/ies) only in the file, 1 only in the draw" in result.output
    assert "no split file" in result.output
    assert "2 problem(s) in 2 cell(s)" in result.output

    # a listed image deleted from disk: named with the count (the fresh draw fails the same way)
    assert invoke("write", *common).exit_code == 1  # write refuses the edited file
    (folder / "shots2_seed1.json").unlink()
    assert invoke("write", *common).exit_code == 0
    listed = json.loads((folder / "shots2_seed1.json").read_text())["train"][0][0]
    (root / "images" / listed).unlink()
    result = invoke("check", *common)
    assert result.exit_code == 1
    assert "1 file(s)" in result.output and listed in result.output


def test_splits_bad_input_is_one_line_exit_2(tmp_path):
    result = invoke("rewrite", "--dataset", "dtd")
    assert result.exit_code == 2 and "did you mean 'write'" in result.output
    result = invoke("write", "--dataset", "dtdd", "--data-root", str(tmp_path))
    assert result.exit_code == 2 and "did you mean 'dtd'" in result.output
    result = invoke("write", "--dataset", "dtd", "--shots", "0")
    assert result.exit_code == 2 and "--shots" in result.output


def test_splits_reads_peftbench_data_and_reports_short_classes(tmp_path, monkeypatch):
    """PEFTBENCH_DATA stands in for --data-root; a class short of K images is a warning in the output
    and `short_groups` in the file, and an error with --strict-shots."""
    write_zhou(tmp_path / "data", "eurosat")
    monkeypatch.setenv("PEFTBENCH_DATA", str(tmp_path / "data"))
    args = ["--dataset", "eurosat", "--shots", str(N_TRAIN + 1), "--seeds", "3",
            "--split-dir", str(tmp_path / "s")]
    result = invoke("write", *args)
    assert result.exit_code == 0, result.output
    assert "3 group(s) have fewer than 5 images" in result.output
    split = json.loads((tmp_path / "s" / "classification" / "eurosat" / "shots5_seed3.json").read_text())
    assert split["short_groups"] == dict.fromkeys(CLASSES, N_TRAIN)
    strict = invoke("write", *args, "--strict-shots")
    assert strict.exit_code == 1 and "--strict-shots" in strict.output
