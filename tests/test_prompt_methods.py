"""CoOp, CoCoOp and MaPLe: official parameter counts on ViT-B/16, exact prompt algebra on the tiny
backbone (learned prompts set to CLIP's own token embeddings reproduce zero-shot CLIP), class-token
positions, depth mapping and bad configs."""

from __future__ import annotations

import pytest
import torch

from peftbench.backbone import load_backbone
from peftbench.config import RunContext
from peftbench.errors import ConfigError
from peftbench.method import l2norm
from peftbench.methods.cocoop import CoCoOp, CoCoOpConfig
from peftbench.methods.coop import CoOp, CoOpConfig
from peftbench.methods.maple import MaPLe, MaPLeConfig
from peftbench.registry import METHODS, get_task, load_plugins

CLASSES = ["red", "green_apple", "blue whale shark", "yellow"]
NAMES = [c.replace("_", " ") for c in CLASSES]
ATOL = 1e-6  # fp32, same tokens and positions: differences come only from kernel order (measured 0)


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def zero_shot_text(backbone, prompts: list[str]) -> torch.Tensor:
    return backbone.encode_text(backbone.tokenize(prompts))  # (C, E)


def ctx_of(backbone, dataset: str = "synth", shots: int = 16, task: str = "classification") -> RunContext:
    i = backbone.info
    return RunContext(task, dataset, shots, 1, i.n_image_blocks, i.n_text_blocks, i.vision_width,
                      i.text_width, i.embed_dim)


# ------------------------------------------------------------------------------ official counts
@pytest.fixture(scope="module")
def vit_b16():
    return load_backbone("ViT-B-16", None)  # random weights: shapes and counts only (~3 s)


@pytest.mark.parametrize(
    ("cls", "expected"),
    [(CoOp, 16 * 512), (CoCoOp, 4 * 512 + 512 * 32 + 32 + 32 * 512 + 512), (MaPLe, 3_555_072)],
)
def test_official_trainable_counts_on_vit_b16(cls, expected, vit_b16):
    cfg = cls.Config().resolve(ctx_of(vit_b16))
    model = cls(vit_b16, CLASSES, cfg)
    assert model.num_trainable() == expected
    # the backbone itself stays frozen
    assert not any(p.requires_grad for p in vit_b16.parameters())


def test_maple_depth_is_official_on_12_blocks(vit_b16):
    model = MaPLe(vit_b16, CLASSES)
    info = model.describe()
    assert info["prompt_depth"] == 9
    assert info["image_layers_prompted"] == list(range(1, 10))
    assert len(model.deep_proj) + 1 == 9 and len(model.deep_text) == 8


# ------------------------------------------------------------------------------ CoOp
def test_coop_phrase_init_reproduces_zero_shot_text_exactly(backbone):
    model = CoOp(backbone, CLASSES, CoOpConfig(ctx_init="a photo of a")).eval()
    ref = zero_shot_text(backbone, [f"a photo of a {c}." for c in NAMES])
    assert model.prompt.ctx.shape == (4, backbone.text_width)
    torch.testing.assert_close(model.class_text_features(), ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(model.encode_text(CLASSES), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("position", "text"),
    [("front", "{} a photo of a."), ("middle", "a photo {} of a."), ("end", "a photo of a {}.")],
)
def test_coop_class_token_positions(position, text, backbone):
    """SOT name ctx . (front) / SOT ctx[:M/2] name ctx[M/2:] . (middle), as CoOp's PromptLearner."""
    cfg = CoOpConfig(ctx_init="a photo of a", class_token_position=position)
    model = CoOp(backbone, CLASSES, cfg).eval()
    ref = zero_shot_text(backbone, [text.format(c) for c in NAMES])
    torch.testing.assert_close(model.class_text_features(), ref, rtol=0, atol=ATOL)


def test_coop_random_context_is_generic_and_differs_from_zero_shot(backbone):
    torch.manual_seed(0)
    model = CoOp(backbone, CLASSES).eval()
    assert model.prompt.ctx.shape == (16, backbone.text_width)
    assert abs(model.prompt.ctx.std().item() - 0.02) < 0.004  # N(0, 0.02)
    assert model.num_trainable() == 16 * backbone.text_width
    assert model.prompts()[1] == " ".join(["X"] * 16) + " green apple."
    ref = zero_shot_text(backbone, [f"a photo of a {c}." for c in NAMES])
    assert (model.class_text_features() - ref).abs().max() > 1e-3


def test_coop_class_specific_context(backbone):
    model = CoOp(backbone, CLASSES, CoOpConfig(csc=True, n_ctx=8)).train()
    assert model.prompt.ctx.shape == (len(CLASSES), 8, backbone.text_width)
    assert model.num_trainable() == len(CLASSES) * 8 * backbone.text_width
    # each class's context only receives the gradient of its own prompt
    model.class_text_features()[1].sum().backward()
    grad = model.prompt.ctx.grad
    assert grad[1].abs().sum() > 0
    assert grad[[0, 2, 3]].abs().sum() == 0


def test_coop_epochs_by_shots_and_dataset(backbone):
    cfg = CoOpConfig()
    got = {s: cfg.resolve(ctx_of(backbone, shots=s)).epochs for s in (1, 2, 4, 8, 16)}
    assert got == {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
    assert cfg.resolve(ctx_of(backbone, dataset="imagenet", shots=16)).epochs == 50
    assert CoOpConfig(epochs=7).resolve(ctx_of(backbone, shots=16)).epochs == 7  # explicit: literal


def test_coop_prompt_longer_than_context_is_refused(backbone):
    long_name = " ".join(["word"] * 14)  # 1 + 16 + 14 + 1 + 1 = 33 > 32 tokens
    with pytest.raises(ConfigError, match="n_ctx") as err:
        CoOp(backbone, [long_name])
    assert "33 tokens" in str(err.value) and "32" in str(err.value)
    CoOp(backbone, [" ".join(["word"] * 13)])  # exactly 32 tokens fits


# ------------------------------------------------------------------------------ CoCoOp
def test_cocoop_with_zero_meta_net_output_is_zero_shot(backbone):
    model = CoCoOp(backbone, CLASSES).eval()
    with torch.no_grad():
        model.meta_net.linear2.weight.zero_()
        model.meta_net.linear2.bias.zero_()
    x = images()
    img = l2norm(backbone.encode_image(x))
    ref = img @ l2norm(zero_shot_text(backbone, [f"a photo of a {c}." for c in NAMES])).t()
    torch.testing.assert_close(model.class_scores(model.encode_image(x), x), ref, rtol=0, atol=ATOL)


def test_cocoop_scores_are_per_image(backbone):
    model = CoCoOp(backbone, CLASSES).eval()
    x = images(3)
    feats = model.encode_image(x)
    batch = model.class_scores(feats, x)
    single = torch.cat([model.class_scores(feats[i : i + 1], x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=0, atol=ATOL)
    # the meta-net reads the L2-normalised joint feature: its input width is embed_dim
    assert model.meta_net.linear1.in_features == backbone.embed_dim
    assert model.meta_net.linear1.out_features == backbone.embed_dim // 16
    assert model.meta_net.linear2.out_features == backbone.text_width
    # the bias differs by image, so the class prompts (and scores) are image-conditioned
    static = l2norm(feats) @ l2norm(model.class_text_features()).t()
    assert (batch - static).abs().max() > 1e-4


# ------------------------------------------------------------------------------ MaPLe
def test_maple_depth_1_text_side_is_zero_shot(backbone):
    model = MaPLe(backbone, CLASSES, MaPLeConfig(prompt_depth=1)).eval()
    ref = zero_shot_text(backbone, [f"a photo of a {c}." for c in NAMES])
    torch.testing.assert_close(model.class_text_features(), ref, rtol=0, atol=ATOL)


def test_maple_deep_text_prompts_replace_the_context_positions(backbone):
    """With the deeper prompt set to CLIP's own hidden states at positions 1..n before block 2,
    the text side equals zero-shot exactly: under the causal mask those states depend only on
    "<SOT> a photo", the same for every class, so the replacement is a no-op."""
    model = MaPLe(backbone, CLASSES).eval()
    assert model.depth == 2  # map_depth(9, 2 blocks)
    n = model.prompt.n_ctx
    tokens = backbone.tokenize([f"a photo of a {c}." for c in NAMES])
    seen = {}

    def capture(i, h):
        seen[i] = h[:, 1 : 1 + n].detach().clone()  # (C, n, w_t)
        return h

    ref = backbone.text_forward(backbone.token_embed(tokens), backbone.eot_index(tokens), capture)
    torch.testing.assert_close(seen[1], seen[1][:1].expand_as(seen[1]), rtol=0, atol=0)
    with torch.no_grad():
        model.deep_text[0].copy_(seen[1][0])
    torch.testing.assert_close(model.class_text_features(), ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(model.encode_text(CLASSES), ref, rtol=0, atol=ATOL)
    with torch.no_grad():
        # (a constant shift would vanish in the next ln_1: perturb with noise)
        noise = torch.randn(model.deep_text[0].shape, generator=torch.Generator().manual_seed(3))
        model.deep_text[0].add_(noise)
    model.eval()  # drop the cached text features
    assert (model.class_text_features() - ref).abs().max() > 1e-3


def test_maple_vision_prompts_are_coupled_to_the_text_prompts(backbone):
    model = MaPLe(backbone, CLASSES).train()
    x = images(2)
    feats = model.encode_image(x)
    assert (feats - backbone.encode_image(x)).abs().max() > 1e-4
    feats.sum().backward()
    # the image loss reaches the text prompts through their projections
    assert model.prompt.ctx.grad.abs().sum() > 0 and model.deep_text[0].grad.abs().sum() > 0
    assert model.proj.weight.grad.abs().sum() > 0 and model.deep_proj[0].weight.grad.abs().sum() > 0


def test_maple_deeper_projections_start_as_copies(vit_b16):
    model = MaPLe(vit_b16, CLASSES)
    first = model.deep_proj[0].weight
    assert all(torch.equal(p.weight, first) for p in model.deep_proj)  # official _get_clones
    assert not torch.equal(model.proj.weight, first)
    assert model.deep_proj[0].weight.data_ptr() != model.deep_proj[1].weight.data_ptr()


def test_maple_depth_mapping_and_explicit_override(backbone):
    ctx = ctx_of(backbone)
    assert MaPLeConfig().resolve(ctx).prompt_depth == 2  # floor(9 * 2 / 12 + 0.5)
    assert MaPLeConfig(prompt_depth=1).resolve(ctx).prompt_depth == 1  # explicit: literal
    model = MaPLe(backbone, CLASSES, MaPLeConfig(prompt_depth=1))
    assert len(model.deep_text) == 0 and model.describe()["prompt_depth"] == 1
    w_t, w_v = backbone.text_width, backbone.vision_width
    assert model.num_trainable() == 2 * w_t + (w_t + 1) * w_v  # ctx + one projection


# ------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (CoOpConfig, "n_ctx", 0),
        (CoOpConfig, "n_ctx", -3),
        (CoOpConfig, "class_token_position", "back"),
        (CoCoOpConfig, "n_ctx", 0),
        (CoCoOpConfig, "meta_reduction", 0),
        (MaPLeConfig, "n_ctx", 0),
        (MaPLeConfig, "prompt_depth", 0),
        (MaPLeConfig, "prompt_depth", -1),
    ],
)
def test_invalid_configs_name_the_field(cls, field, value):
    with pytest.raises(ConfigError, match=field) as err:
        cls(**{field: value})
    assert err.value.field == field


def test_prompt_depth_beyond_the_tower_is_refused(backbone):
    cfg = MaPLeConfig(prompt_depth=3)  # the tiny text tower has 2 blocks
    with pytest.raises(ConfigError, match=r"prompt_depth.*\[1, 2\]"):
        cfg.resolve(ctx_of(backbone))
    with pytest.raises(ConfigError, match="prompt_depth"):
        MaPLe(backbone, CLASSES, cfg)


# ------------------------------------------------------------------------------ both tasks
@pytest.mark.parametrize("name", ["coop", "cocoop", "maple"])
def test_runs_on_both_tasks_text_side_trains_through_retrieval_loss(name, backbone):
    load_plugins()

    cls = METHODS[name]
    assert set(cls.tasks) == {"classification", "ucdr"}
    model = cls(backbone, CLASSES, cls.Config().resolve(ctx_of(backbone, task="ucdr"))).train()
    x, labels = images(4), torch.tensor([0, 1, 0, 1])
    for task in ("classification", "ucdr"):
        model.zero_grad()
        loss = get_task(task)().loss(model, (x, labels))
        loss.backward()
        assert torch.isfinite(loss)
        assert model.prompt.ctx.grad is not None and model.prompt.ctx.grad.abs().sum() > 0
    # retrieval ranks the image embedding: CoOp leaves it untouched, MaPLe prompts it
    same = torch.allclose(model.encode_image(x), backbone.encode_image(x), atol=ATOL)
    assert same == (name in ("coop", "cocoop"))


def test_maple_random_init_when_the_phrase_is_shorter_than_the_context(backbone):
    """Official rule: init from ctx_init only if n_ctx fits in it; otherwise N(0, 0.02) with "X" tokens."""
    torch.manual_seed(0)
    model = MaPLe(backbone, CLASSES, MaPLeConfig(n_ctx=6))  # "a photo of a" has 4 tokens
    assert model.prompts()[0] == "X X X X X X red."
    assert model.prompt.ctx.shape == (6, backbone.text_width)
    assert abs(model.prompt.ctx.std().item() - 0.02) < 0.006
