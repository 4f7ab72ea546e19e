"""The method contract, enumerated over the registry: a newly registered method is tested here
the moment it exists (tiny open_clip config, CPU, generated tensors, no network)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from peftbench.cli import app
from peftbench.config import RunContext
from peftbench.method import l2norm
from peftbench.registry import METHODS, load_plugins
from peftbench.task import TaskData

load_plugins()
ALL_METHODS = sorted(METHODS)
TRAINING_FREE = {"zeroshot"}  # methods that legitimately train nothing
TRAINED = [m for m in ALL_METHODS if m not in TRAINING_FREE]
CLASSES = ["red square", "green_circle", "blue star", "yellow triangle"]
SHOTS = 2


def context(backbone, task="classification") -> RunContext:
    i = backbone.info
    return RunContext(
        task, "synth", SHOTS, 1, i.n_image_blocks, i.n_text_blocks, i.vision_width, i.text_width, i.embed_dim
    )


def tiny_data(n_per_class: int = SHOTS) -> TaskData:
    g = torch.Generator().manual_seed(0)
    n = n_per_class * len(CLASSES)
    images = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    ds = TensorDataset(images, labels)
    return TaskData(list(CLASSES), "a photo of a {}.", ds, ds, ds, {})


def build(name: str, backbone, data: TaskData | None = None):
    cls = METHODS[name]
    task = "classification"
    cfg = cls.Config().resolve(context(backbone, task))
    model = cls(backbone, CLASSES, cfg, template="a photo of a {}.")
    torch.manual_seed(0)
    model.prepare(data or tiny_data())
    return model


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def perturb(model, scale: float = 0.5) -> None:
    """Random non-initial values for every trainable tensor (not shrunk to pass anything)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(
                scale
                * torch.randn(p.shape, generator=g)
                * (p.detach().std() if p.numel() > 1 and p.std() > 0 else 1)
            )


def zero_shot_logits(backbone, prompts, x):
    img = l2norm(backbone.encode_image(x))
    txt = l2norm(backbone.encode_text(backbone.tokenize(prompts)))
    return backbone.logit_scale * img @ txt.t()


@pytest.mark.parametrize("name", ALL_METHODS)
def test_forward_shapes(name, backbone):
    model = build(name, backbone).eval()
    with torch.no_grad():
        logits = model.logits(images())
        feats = model.encode_image(images())
    assert logits.shape == (4, len(CLASSES))
    assert feats.shape == (4, backbone.embed_dim)
    assert torch.isfinite(logits).all()


def test_training_free_methods_train_nothing(backbone):
    for name in TRAINING_FREE:
        assert build(name, backbone.copy()).num_trainable() == 0


@pytest.mark.parametrize("name", TRAINED)
def test_gradients_reach_exactly_the_trainable_tensors(name, backbone):
    model = build(name, backbone)
    trainable = model.trainable_parameters()
    assert trainable, f"{name} has no trainable parameters (add it to TRAINING_FREE if that is intended)"
    ids = {id(p) for p in trainable}
    opt = torch.optim.SGD(trainable, lr=0.05)
    x, y = images(), torch.arange(4) % len(CLASSES)
    model.train()
    for _ in range(2):  # after one step, zero-initialised tensors (LoRA's B, bridges) unblock the rest
        opt.zero_grad()
        loss = F.cross_entropy(model.logits(x), y)
        reg = model.regularizer()
        (loss + (reg if reg is not None else 0)).backward()
        if _ == 0:
            opt.step()
    for n, p in model.named_parameters():
        if id(p) in ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: trainable {n} got no gradient"
        else:
            assert p.grad is None, f"{name}: frozen {n} received a gradient"
    assert all(not p.requires_grad for p in model.backbone.parameters() if id(p) not in ids)


@pytest.mark.parametrize("name", TRAINED)
def test_random_trainable_values_change_the_output(name, backbone, tiny_backbone):
    model = build(name, backbone)
    perturb(model)
    model.eval()
    x = images()
    with torch.no_grad():
        ours = model.logits(x)
        ref = zero_shot_logits(tiny_backbone, model.prompts(), x)
    assert (ours - ref).abs().max() > 1e-3


@pytest.mark.parametrize("name", ALL_METHODS)
def test_reported_count_matches_cli_params(name, backbone):
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "params",
            "--method",
            name,
            "--backbone",
            TINY,
            "--shots",
            str(SHOTS),
            "--classes",
            str(len(CLASSES)),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    reported = json.loads(res.stdout)["trainable"]
    model = build(name, backbone)
    assert reported == model.num_trainable() == sum(p.numel() for p in model.trainable_parameters())


@pytest.mark.parametrize("name", ALL_METHODS)
def test_trainable_state_round_trip(name, backbone, tiny_backbone):
    model = build(name, backbone)
    perturb(model)
    state = model.trainable_state_dict()
    fresh = build(name, tiny_backbone.copy())
    fresh.load_trainable_state_dict(state)
    model.eval()
    fresh.eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(model.logits(x), fresh.logits(x))


@pytest.mark.parametrize("name", [m for m in ALL_METHODS if METHODS[m].identity_at_init])
def test_identity_at_initialisation(name, backbone, tiny_backbone):
    model = build(name, backbone).eval()
    x = images()
    with torch.no_grad():
        img = l2norm(model.encode_image(x))
        ref_img = l2norm(tiny_backbone.encode_image(x))
        txt = l2norm(model.class_text_features())
        ref_txt = l2norm(tiny_backbone.encode_text(tiny_backbone.tokenize(model.prompts())))
        logits = model.logits(x)
        ref_logits = zero_shot_logits(tiny_backbone, model.prompts(), x)
    assert (img - ref_img).abs().max() <= 1e-6
    assert (txt - ref_txt).abs().max() <= 1e-6
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()) <= 1e-6


@pytest.mark.parametrize("name", [m for m in ALL_METHODS if METHODS[m].mergeable])
def test_merge_is_exact_in_float64(name, backbone, tiny_backbone):
    model = build(name, backbone)
    perturb(model)
    model = model.to(torch.float64).eval()
    x = images().double()
    with torch.no_grad():
        before_img = model.encode_image(x)
        before_txt = model.class_text_features()
        merged = model.deployed().eval()
        after_img = merged.encode_image(x)
        after_txt = merged.class_text_features()
    assert type(merged.backbone.model) is type(tiny_backbone.model)
    ref_keys = {k: v.shape for k, v in tiny_backbone.model.state_dict().items()}
    assert {k: v.shape for k, v in merged.backbone.model.state_dict().items()} == ref_keys
    assert ((after_img - before_img).norm() / before_img.norm()) <= 1e-9
    assert ((after_txt - before_txt).norm() / before_txt.norm()) <= 1e-9
