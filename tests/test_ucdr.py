"""The UCDR task end to end on tiny fake DomainNet / Sketchy / TU-Berlin trees (real PNG/JPEG files).

Class lists are monkeypatched to a handful of classes; every run goes through
`peftbench.runner.execute` with the tiny-test backbone and trains 2 steps (`task.steps=2`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peftbench.errors import ConfigError, UsageError
from peftbench.registry import load_plugins
from peftbench.results import ResultStore
from peftbench.runner import RunSpec, execute, resolve
from peftbench.task import DataEnv

load_plugins()
from peftbench.tasks import ucdr, ucdr_datasets  # noqa: E402

TINY = "tiny-test"
LISTS = {
    "domainnet_trainval_classes": ["bee", "ant", "cat"],
    "domainnet_test_classes": ["dog", "eel"],
    "sketchy_train_classes_eccv2018": ["bee", "ant", "cat"],
    "sketchy_test_classes_eccv2018": ["dog", "eel"],
    "sketchy_train_classes_random": ["ant", "bee", "dog"],
    "sketchy_test_classes_random": ["cat", "eel"],
    "tuberlin_trainval_classes": ["bee", "ant", "cat"],
    "tuberlin_test_classes": ["dog", "eel"],
    "tuberlin_test_classes_mail25": ["dog"],
    "tuberlin_val_classes": ["cat"],
    "tuberlin_all_classes": ["ant", "bee", "cat", "dog", "eel"],
}


@pytest.fixture(autouse=True)
def small_lists(monkeypatch):
    monkeypatch.setattr(ucdr_datasets, "read_class_list", lambda name: list(LISTS[name]))


def write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_tree(root: Path, domains: dict[str, str], classes: list[str], n: dict[str, int]) -> None:
    """root/<domain>/<class>/<i>.<ext>, n[domain] images per class."""
    for di, (domain, ext) in enumerate(domains.items()):
        for ci, c in enumerate(classes):
            for i in range(n[domain]):
                write_image(root / domain / c / f"{domain}_{c}_{i:03d}.{ext}", 1000 * di + 100 * ci + i)


DN_DOMAINS = {"clipart": "jpg", "quickdraw": "png", "real": "jpg", "sketch": "jpg"}
DN_N = {"clipart": 3, "quickdraw": 10, "real": 13, "sketch": 4}


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    write_tree(root / "DomainNet", DN_DOMAINS, ["bee", "ant", "cat", "dog", "eel"], DN_N)
    write_tree(
        root / "Sketchy",
        {"sketch": "png", "extended_photo": "jpg"},
        ["ant", "bee", "cat", "dog", "eel"],
        {"sketch": 3, "extended_photo": 4},
    )
    write_tree(
        root / "TUBerlin",
        {"sketches": "png", "images": "jpg"},
        ["ant", "bee", "cat", "dog", "eel"],
        {"sketches": 3, "images": 4},
    )
    return root


def env_for(tmp_path: Path, root: Path | None) -> DataEnv:
    return DataEnv(data_root=root, split_dir=tmp_path / "splits", eval_batch_size=16)


def run(tmp_path, root, dataset, method="lora", shots=2, **task):
    spec = RunSpec(
        method=method,
        task="ucdr",
        dataset=dataset,
        backbone=TINY,
        pretrained=None,
        shots=shots,
        seed=1,
        task_overrides=(("steps", 2), *task.items()),
    )
    out = execute(spec, ResultStore(tmp_path / "results"), env_for(tmp_path, root), progress=False)
    assert out.status == "ok", out.record.get("traceback")
    return out.record


def test_domainnet_end_to_end(tmp_path, data_root):
    rec = run(tmp_path, data_root, "domainnet")
    m = rec["metrics"]
    assert set(m) == {"map@200", "prec@200", "map@200_mixed", "prec@200_mixed", "map@200_ud", "prec@200_ud"}
    assert all(v["direction"] == "higher" and 0.0 <= v["value"] <= 1.0 for v in m.values())
    assert rec["train"]["steps"] == 2
    info, data = rec["task_info"], rec["data"]
    assert info["train_domains"] == ["clipart", "quickdraw", "real"]  # sketch held out
    assert info["inverted_domains"] == ["quickdraw", "sketch"] and info["inversion_default"]
    assert info["similarity"] == "cosine" and info["retrieval_rules"]["ties"].startswith("stable")
    # K per (seen class, training domain): 3 classes x 3 domains x 2 shots
    assert data["n_train"] == 18
    # 92/8 split of 13 real images: 11 train, 2 held back per seen class -> mixed gallery 3 x 2
    assert data["test_sets"]["gallery_seen_heldback"] == 6
    # UCDR: 2 unseen classes x 4 sketches against 2 x 13 real; U^d-CDR: 25% of 4 sketches, of 13 reals
    assert data["test_sets"]["query_unseen"] == 8 and data["test_sets"]["gallery_unseen"] == 26
    assert data["test_sets"]["query_ud"] == 3 * 1 and data["test_sets"]["gallery_ud"] == 3 * 3
    assert info["evaluation"]["ucdr"]["k_capped"] and info["evaluation"]["ucdr"]["map_k"] == 26
    assert rec["timing"]["eval_images"] == 8 + 26 + 6 + 3 + 9
    split = json.loads(Path(data["split_file"]).read_text())
    assert all(d != "sketch" for _, _, d in split["train"])  # the held-out domain is never trained on
    val = split["val"]
    # validation: paired seen domain (sketch -> quickdraw) and the 92% real portion; never unseen classes
    assert {d for _, _, d, role in val if role == "query"} == {"quickdraw"}
    assert {d for _, _, d, role in val if role == "gallery"} == {"real"}
    assert {c for _, c, _, _ in val} <= {0, 1, 2}
    shots = {p for p, *_ in split["train"]}
    assert not shots & {p for p, *_ in val}
    heldback_real = set()
    for i, c in enumerate(LISTS["domainnet_trainval_classes"]):
        paths = sorted(f"real/{c}/{p.name}" for p in (data_root / "DomainNet" / "real" / c).iterdir())
        keep = set(np.random.RandomState(i).choice(len(paths), 11, replace=False).tolist())
        heldback_real |= {paths[j] for j in range(len(paths)) if j not in keep}
    assert not heldback_real & ({p for p, *_ in val} | shots)


def test_domainnet_split_is_seed_driven_and_stable(tmp_path, data_root):
    task_cls = ucdr.UCDR
    env = env_for(tmp_path, data_root)
    from peftbench.backbone import load_backbone

    bb = load_backbone(TINY, None)
    a = task_cls().build("domainnet", 2, 1, bb, env)
    again = task_cls().build("domainnet", 2, 1, bb, env)  # the split file exists: checked, same draw
    b = task_cls().build("domainnet", 2, 2, bb, env)
    assert a.train.items == again.train.items
    assert a.train.items != b.train.items
    # the 92/8 split is seeded by class index, not the run seed
    assert a.test.images["gallery_seen_heldback"].items == b.test.images["gallery_seen_heldback"].items
    # an item is (path, class, domain index) and sketch items are inverted
    sk = a.test.images["query_unseen"]
    assert all(flag for flag in sk.invert) and sk[0][0].shape[0] == 3


@pytest.mark.parametrize(
    "dataset,extra,metric_names,train,val_q",
    [
        ("sketchy", {}, {"map@200", "prec@200"}, 12, {"sketch"}),
        ("sketchy", {"class_split": "random"}, {"map@all", "prec@100"}, 12, {"sketch"}),
        ("tuberlin", {}, {"map@all", "prec@100"}, 12, {"sketches"}),
    ],
)
def test_two_domain_end_to_end(tmp_path, data_root, dataset, extra, metric_names, train, val_q):
    rec = run(tmp_path, data_root, dataset, **extra)
    assert set(rec["metrics"]) == metric_names
    assert rec["data"]["n_train"] == train  # 3 seen classes x 2 domains x 2 shots
    info = rec["task_info"]
    assert info["settings"] == ["uccdr"] and info["validation_query_domain"] in val_q
    if dataset == "tuberlin":
        assert info["inverted_domains"] == []  # the reference quirk: "sketches" is not inverted
    else:
        assert info["inverted_domains"] == ["sketch"]
    split = json.loads(Path(rec["data"]["split_file"]).read_text())
    test_labels = set(range(3, 5))
    assert not {c for _, c, *_ in split["train"] + split["val"]} & test_labels


def test_tuberlin_inversion_option_and_mail25(tmp_path, data_root):
    rec = run(tmp_path, data_root, "tuberlin", invert=("sketches",), class_split="mail25")
    info = rec["task_info"]
    assert info["inverted_domains"] == ["sketches"] and not info["inversion_default"]
    assert info["class_split"] == "mail25"
    # mail25 (patched: test = dog): training = all - test - val, sorted, then val -> ant, bee, eel, cat
    assert rec["data"]["n_seen_classes"] == 4


def test_euclidean_similarity_is_recorded(tmp_path, data_root):
    rec = run(tmp_path, data_root, "sketchy", method="zeroshot", similarity="euclidean")
    assert (
        rec["task_info"]["similarity"] == "euclidean"
        and rec["resolved"]["task"]["options"]["similarity"] == "euclidean"
    )
    assert rec["train"]["steps"] == 0  # zero-shot stays untrained


# ------------------------------------------------------------------------------ recipe
def test_recipe_steps_and_warmup():
    from peftbench.config import RunContext
    from peftbench.registry import get_method

    ctx = RunContext("ucdr", "sketchy", 4, 1, 2, 2, 64, 48, 32)
    cfg = get_method("coop").Config().resolve(ctx)
    task = ucdr.UCDR()
    out = task.resolve_method_config(cfg, ctx)
    # patched Sketchy: 3 seen classes x 4 shots / 12 = 1 step per epoch x 20 epochs, raised to 100
    assert out.iterations == 100 and out.epochs is None and out.batch_size == 24
    assert out.lr == cfg.lr and out.optimizer == cfg.optimizer and out.weight_decay == cfg.weight_decay
    assert out.warmup_iters == round(cfg.warmup_epochs / cfg.epochs * 100) and out.warmup_epochs == 0
    task = ucdr.UCDR(ucdr.UCDROptions(min_steps=0))
    assert task.resolve_method_config(cfg, ctx).iterations == 20
    zs = get_method("zeroshot").Config()
    assert ucdr.UCDR().resolve_method_config(zs, ctx) == zs


def test_sampler_is_mail_shaped_and_deterministic():
    labels = [c for c in range(5) for _ in range(2)] * 2  # 5 classes x 2 shots x 2 domains
    domains = [0] * 10 + [1] * 10
    s = ucdr.MAILBatchSampler(labels, domains, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 1  # min(10, 10) // 12 -> at least 1
    b = batches[0]
    assert len(b) == 2 * 3 * 4
    for d in (0, 1):
        part = b[d * 12 : (d + 1) * 12]
        assert {domains[i] for i in part} == {d}
        for k in range(3):  # 3 classes x 4 images, each K=2 shot twice
            grp = part[4 * k : 4 * k + 4]
            assert len({labels[i] for i in grp}) == 1 and len(set(grp)) == 2
    assert list(ucdr.MAILBatchSampler(labels, domains, seed=3)) == batches
    assert list(ucdr.MAILBatchSampler(labels, domains, seed=4)) != batches


def test_triplet_hardest_pair():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.1]])
    y = torch.tensor([0, 0, 1, 1])
    # anchor 0: d_pos = 1 (to 1), d_neg = 0 (to 2) -> 1.5; anchor 1: d_pos 1, d_neg ~0.9950 -> ~0.505
    z = torch.nn.functional.normalize(f, dim=-1)
    d = 1 - z @ z.t()
    expected = [1 - 0 + 0.5, 1 - d[1, 3] + 0.5, d[2, 3] - 0 + 0.5, d[3, 2] - d[3, 0] + 0.5]
    got = ucdr.triplet_hardest(f, y)
    assert torch.isclose(got, torch.stack([torch.as_tensor(e).clamp_min(0) for e in expected]).mean())
    assert ucdr.triplet_hardest(f[:2], torch.tensor([0, 1])) == 0  # no positive pair


# ------------------------------------------------------------------------------ bad input
def test_bad_held_out_and_settings(tmp_path, data_root):
    with pytest.raises(ConfigError, match="held_out.*clipart, quickdraw, sketch"):
        run(tmp_path, data_root, "domainnet", held_out="painting")
    with pytest.raises(ConfigError, match="held_out"):
        run(tmp_path, data_root, "tuberlin", held_out="quickdraw")
    with pytest.raises(ConfigError, match="settings"):
        run(tmp_path, data_root, "sketchy", settings=("udcdr",))
    with pytest.raises(UsageError, match="class_split.*eccv2018, random"):
        run(tmp_path, data_root, "sketchy", class_split="mail25")
    with pytest.raises(ConfigError, match="similarity"):
        ucdr.UCDROptions(similarity="dot")


def test_wrong_layout_names_tree_and_path(tmp_path, data_root):
    (data_root / "TUBerlin" / "images").rename(data_root / "TUBerlin" / "photos")
    with pytest.raises(UsageError, match=r"TUBerlin/images not found.*TUBerlin/\{sketches,images\}"):
        run(tmp_path, data_root, "tuberlin")
    with pytest.raises(UsageError, match=r"Sketchy.*not found \(expected layout"):
        run(tmp_path, tmp_path / "nowhere", "sketchy")
    with pytest.raises(UsageError, match="--data-root"):
        run(tmp_path, None, "domainnet")


def test_absent_and_unlisted_classes_warn(tmp_path, data_root):
    import shutil

    for d in ("sketch", "real"):
        shutil.rmtree(data_root / "DomainNet" / d / "eel")
    write_image(data_root / "DomainNet" / "real" / "zebra" / "real_zebra_000.jpg", 7)
    with pytest.warns(UserWarning) as caught:
        rec = run(tmp_path, data_root, "domainnet")
    msgs = [str(w.message) for w in caught]
    assert any("1 unseen class(es)" in m and "absent" in m for m in msgs)
    assert any("1 class folder(s) on disk are in no class list" in m for m in msgs)
    assert rec["task_info"]["classes_absent"] == {"seen": 0, "unseen": 1}
    assert rec["data"]["test_sets"]["query_unseen"] == 4


def test_no_test_class_is_an_error(tmp_path, data_root):
    import shutil

    for c in ("dog", "eel"):
        shutil.rmtree(data_root / "Sketchy" / "sketch" / c)
    with pytest.raises(UsageError, match="none of the 2 test classes"):
        run(tmp_path, data_root, "sketchy")


def test_missing_listed_files_one_error(tmp_path, data_root, monkeypatch):
    real_load = ucdr_datasets.Sketchy.load

    def load_with_ghosts(self, env, options):
        src = real_load(self, env, options)
        src.files["sketch", "dog"] = [
            *src.files["sketch", "dog"],
            "sketch/dog/ghost1.png",
            "sketch/dog/ghost2.png",
        ]
        return src

    monkeypatch.setattr(ucdr_datasets.Sketchy, "load", load_with_ghosts)
    with pytest.raises(
        UsageError, match=r"2 file\(s\) listed .* missing .*ghost1.png, sketch/dog/ghost2.png"
    ):
        run(tmp_path, data_root, "sketchy")


def test_sketchy_unflattened_download_is_explained(tmp_path, data_root):
    (data_root / "Sketchy" / "sketch" / "tx_000000000000").mkdir()
    with pytest.raises(UsageError, match="must be flattened"):
        run(tmp_path, data_root, "sketchy")


def test_corrupt_image_is_named(tmp_path, data_root):
    bad = data_root / "Sketchy" / "extended_photo" / "dog" / "extended_photo_dog_000.jpg"
    bad.write_bytes(b"not an image")
    spec = RunSpec(
        method="zeroshot",
        task="ucdr",
        dataset="sketchy",
        backbone=TINY,
        pretrained=None,
        shots=1,
        task_overrides=(("steps", 0),),
    )
    env = env_for(tmp_path, data_root)
    with pytest.raises(UsageError, match="cannot read image .*extended_photo_dog_000.jpg"):
        execute(spec, ResultStore(tmp_path / "results"), env, progress=False)
    env.skip_corrupt = True
    out = execute(spec, ResultStore(tmp_path / "results2"), env, progress=False)
    assert out.status == "ok" and out.record["task_info"]["corrupt_skipped"] == 1


def test_resolve_hashes_task_options():
    base = dict(method="zeroshot", task="ucdr", dataset="sketchy", backbone=TINY, pretrained=None)
    h1 = resolve(RunSpec(**base), torch.device("cpu")).config_hash
    h2 = resolve(
        RunSpec(**base, task_overrides=(("similarity", "euclidean"),)), torch.device("cpu")
    ).config_hash
    assert h1 != h2


def test_domainnet_quickdraw_held_out_uses_its_pair_and_fraction(tmp_path, data_root):
    from peftbench.backbone import load_backbone

    task = ucdr.UCDR(ucdr.UCDROptions(held_out="quickdraw"))
    data = task.build("domainnet", 1, 1, load_backbone(TINY, None), env_for(tmp_path, data_root))
    assert data.info["udcdr_fraction"] == 0.10 and data.info["validation_query_domain"] == "sketch"
    assert data.info["train_domains"] == ["clipart", "real", "sketch"]
    assert all(d != 1 for _, _, d in data.train.items)  # quickdraw (domain index 1) never trains
    # U^d-CDR: floor(0.10 x 10) = 1 quickdraw query and floor(0.10 x 13) = 1 real per seen class
    assert len(data.test.images["query_ud"]) == 3 and len(data.test.images["gallery_ud"]) == 3
    for c in LISTS["domainnet_trainval_classes"]:  # one quickdraw image per seen class: floor(0.1) = 0
        for f in (data_root / "DomainNet" / "quickdraw" / c).iterdir():
            if not f.name.endswith("_000.png"):
                f.unlink()
    with pytest.raises(UsageError, match="U\\^d-CDR has no images"):
        task.build("domainnet", 1, 1, load_backbone(TINY, None), env_for(tmp_path / "b", data_root))
