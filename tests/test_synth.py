"""The embedded world: generator determinism and domains, bad names, the shipped weights, and the
no-flag demo run. Generated images are cached in pytest's cache folder (not the user's)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from peftbench.backbone import load_backbone
from peftbench.cli import app
from peftbench.errors import UsageError
from peftbench.registry import get_dataset
from peftbench.results import ResultStore
from peftbench.synth import MANIFEST, WEIGHTS
from peftbench.synth import generator as G
from peftbench.synth.pretrain import TEMPLATE, to_tensor


@pytest.fixture
def synth_cache(request, monkeypatch, tmp_path_factory):
    """A persistent cache under .pytest_cache (when pytest's cache plugin is on), so repeated runs
    do not redraw the images; a session temporary folder otherwise."""
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("peftbench-synth") if cache else tmp_path_factory.mktemp("peftbench-synth")
    monkeypatch.setenv("PEFTBENCH_CACHE", str(root))
    return root


def test_same_key_same_image_and_keys_differ():
    a = G.render_array(37, "painting", 5)
    assert a.shape == (G.IMAGE_SIZE, G.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, G.render_array(37, "painting", 5))
    assert not np.array_equal(a, G.render_array(37, "painting", 6))
    assert not np.array_equal(a, G.render_array(38, "painting", 5))


def test_domains_are_distinct():
    """Mean image statistics per domain differ clearly (white-ground domains vs textured ones),
    and no two domains render the same (class, index) alike."""
    imgs = {d: np.stack([G.render_array(c, d, 0) for c in range(0, 120, 7)]).astype(float) for d in G.DOMAINS}
    for i, d1 in enumerate(G.DOMAINS):
        for d2 in G.DOMAINS[i + 1:]:
            diff = np.abs(imgs[d1] - imgs[d2]).mean()
            assert diff > 10, f"{d1} and {d2} look alike (mean abs difference {diff:.1f})"
    white = {d: (imgs[d] > 240).all(-1).mean() for d in G.DOMAINS}
    assert white["sketch"] > 0.5 and white["quickdraw"] > 0.5
    assert white["photo"] < 0.05 and white["painting"] < 0.05


def test_captions_and_splits():
    assert G.caption(G.class_id("red_star"), "sketch") == "a sketch of a red star"
    assert G.caption(G.class_id("blue_ring"), "infograph") == "an infographic of a blue ring"
    assert len(G.CLASSNAMES) >= 100 and len(G.COLOURS) >= 10 and len(G.SHAPES) >= 10 and len(G.DOMAINS) >= 6
    assert set(G.HELDOUT_DOMAINS).isdisjoint(G.PRETRAIN_DOMAINS)
    assert set(G.HELDOUT_CLASSES).isdisjoint(G.PRETRAIN_CLASSES)
    # every held-out class combines a colour and a shape that pretraining saw in other classes
    seen = [G.CLASSNAMES[c].split("_") for c in G.PRETRAIN_CLASSES]
    for c in G.HELDOUT_CLASSES:
        colour, shape = G.CLASSNAMES[c].split("_")
        assert any(s[0] == colour for s in seen) and any(s[1] == shape for s in seen)


def test_unknown_names_list_the_choices():
    with pytest.raises(UsageError, match="did you mean 'sketch'.*quickdraw"):
        G.check_domain("sktech")
    with pytest.raises(UsageError, match="red, orange"):
        G.class_id("mauve_star")
    with pytest.raises(UsageError, match="synth_sketch"):
        get_dataset("classification", "synth_sktech")
    from peftbench.tasks.ucdr import UCDROptions

    with pytest.raises(UsageError, match="task.held_out.*sketch, quickdraw"):
        get_dataset("ucdr", "synth")().load(None, UCDROptions(held_out="painting"))


def test_cache_is_written_atomically_and_matches_render(tmp_path):
    keys = [(3, "clipart", 0), (3, "quickdraw", 1)]
    root = G.ensure_images(keys, tmp_path)
    for c, d, i in keys:
        from PIL import Image

        with Image.open(root / G.rel_path(c, d, i)) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), G.render_array(c, d, i))
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_shipped_weights_match_manifest():
    manifest = json.loads(MANIFEST.read_text())
    h = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert h == manifest["sha256"]
    assert WEIGHTS.stat().st_size <= 24 * 2**20


def test_zero_shot_accuracy_on_pretraining_domains():
    """>= 30% top-1 over all 120 classes on 480 fixed images (one per class and pretraining
    domain, indices never used in pretraining), with the datasets' template."""
    bb = load_backbone("synth-tiny")
    assert bb.info.pretrained == str(WEIGHTS)
    arrays = [G.render_array(c, d, 0) for d in G.PRETRAIN_DOMAINS for c in range(len(G.CLASSNAMES))]
    labels = torch.arange(len(G.CLASSNAMES)).repeat(len(G.PRETRAIN_DOMAINS))
    with torch.no_grad():
        img = F.normalize(bb.encode_image(to_tensor(np.stack(arrays))), dim=-1)  # (480, E)
        txt = bb.encode_text(bb.tokenize([TEMPLATE.format(n.replace("_", " ")) for n in G.CLASSNAMES]))
        acc = ((img @ F.normalize(txt, dim=-1).t()).argmax(1) == labels).float().mean().item()
    assert acc >= 0.30, f"zero-shot accuracy {acc:.3f} on the pretraining domains"


def test_demo_run_with_no_flags(tmp_path, synth_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(
        app, ["run", "--method", "zeroshot", "--task", "classification", "--results-dir", str(tmp_path / "r")]
    )
    assert res.exit_code == 0, res.output
    records = ResultStore(tmp_path / "r").records()
    assert records and records[0]["status"] == "ok"
    assert records[0]["resolved"]["task"]["dataset"] == "synth"
    assert records[0]["data"]["n_classes"] == len(G.CLASSNAMES)
    assert records[0]["task_info"]["train_crop_scale"] == [0.9, 1.0]  # the 32 px world's milder crop
    assert records[0]["metrics"]["acc"]["value"] > 3 * 100 / len(G.CLASSNAMES)
