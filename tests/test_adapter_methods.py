"""CLIP-Adapter, LoRA (CLIP-LoRA), MMA and Tip-Adapter-F: official counts, algebra, bad input.

The generic registry contract (forward, backward, save/load) is in tests/test_contract.py; this
file checks what is specific to these four ports.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from peftbench.backbone import load_backbone
from peftbench.config import RunContext, build_config
from peftbench.errors import ConfigError
from peftbench.method import l2norm
from peftbench.methods.clip_adapter import CLIPAdapter, CLIPAdapterConfig
from peftbench.methods.lora import LoRA, LoRAAttention, LoRAConfig
from peftbench.methods.mma import MMA, MMABlock, MMAConfig, grad_scale
from peftbench.methods.tip_adapter import TipAdapter, TipAdapterConfig, search_grid

CLASSES = ["red", "green", "blue", "yellow"]


def ctx(bb, shots: int = 16, dataset: str = "imagefolder") -> RunContext:
    i = bb.info
    return RunContext("classification", dataset, shots, 1, i.n_image_blocks, i.n_text_blocks,
                      i.vision_width, i.text_width, i.embed_dim)


def images(bb, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = bb.info.image_size
    return torch.randn(n, 3, s, s, generator=g)


def randomize(params, std: float = 0.3, seed: int = 1) -> None:
    """Non-initial values for every trainable tensor (random, not shrunk)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def vitb16():
    return load_backbone("ViT-B-16", None)


# ----------------------------------------------------------------------------- counts
@pytest.mark.parametrize(("cls", "expected"), [(CLIPAdapter, 131_072), (LoRA, 184_320), (MMA, 674_560)])
def test_vitb16_trainable_counts_match_official(vitb16, cls, expected):
    cfg = cls.Config().resolve(ctx(vitb16))
    model = cls(vitb16.copy(), CLASSES, cfg)
    assert model.num_trainable() == expected


def test_tip_adapter_count_is_d_times_classes_times_shots(vitb16):
    cfg = TipAdapterConfig().resolve(ctx(vitb16, shots=16))
    model = TipAdapter(vitb16, [f"c{i}" for i in range(1000)], cfg)  # the backbone is not modified
    assert cfg.shots == 16
    assert model.num_trainable() == 512 * 1000 * 16 == 8_192_000


# ----------------------------------------------------------------------------- LoRA
def lora_outputs(model_or_bb, x, prompts):
    with torch.no_grad():
        if hasattr(model_or_bb, "encode_text") and hasattr(model_or_bb, "prompts"):
            return model_or_bb.encode_image(x), model_or_bb.encode_text(prompts)
        return model_or_bb.encode_image(x), model_or_bb.encode_text(model_or_bb.tokenize(prompts))


def test_lora_identity_at_init(backbone, tiny_backbone):
    model = LoRA(backbone, CLASSES).eval()
    x = images(backbone)
    fi, ft = lora_outputs(model, x, model.prompts())
    zi, zt = lora_outputs(tiny_backbone, x, model.prompts())
    assert (l2norm(fi) - l2norm(zi)).abs().max() < 1e-6
    assert (l2norm(ft) - l2norm(zt)).abs().max() < 1e-6


@pytest.mark.parametrize("which", ["tiny", "vitb16"])
def test_lora_merge_equals_unmerged_fp32(request, which):
    """fp32, max abs 1e-5: B non-zero (N(0, 0.3)), A at its Kaiming-uniform init, as after training
    (B starts at zero and moves; A starts at its init). The outputs move by ~0.2 (ViT-B/16)."""
    base = request.getfixturevalue("tiny_backbone" if which == "tiny" else "vitb16")
    model = LoRA(base.copy(), ["cat", "dog"]).eval()
    randomize([p for n, p in model.named_parameters() if "lora_B" in n], std=0.3)
    x = images(base, 2)
    prompts = model.prompts()
    fi, ft = lora_outputs(model, x, prompts)
    merged = model.merge()
    mi, mt = lora_outputs(merged, x, prompts)
    zi, zt = lora_outputs(base, x, prompts)
    assert (fi - mi).abs().max() <= 1e-5 and (ft - mt).abs().max() <= 1e-5
    # the same weights really moved the model away from zero-shot
    assert (fi - zi).abs().max() > 1e-3 and (ft - zt).abs().max() > 1e-3
    # a plain CLIP of unchanged architecture, frozen, with the same state-dict keys and shapes
    assert not any(isinstance(m, LoRAAttention) for m in merged.modules())
    assert not any(p.requires_grad for p in merged.parameters())
    ref = {k: v.shape for k, v in base.model.state_dict().items()}
    assert {k: v.shape for k, v in merged.model.state_dict().items()} == ref


def test_lora_merge_is_exact_in_float64(tiny_backbone):
    """The fold itself is exact: A and B both random N(0, 0.3) (deltas larger than the frozen
    weights), compared in float64 relative to the embeddings' norm. (ViT-B/16 gives 1e-13 too,
    measured once; too slow in float64 for the suite.)"""
    base = tiny_backbone.copy().double()
    model = LoRA(base.copy(), ["cat", "dog"]).eval().double()
    randomize(model.trainable_parameters(), std=0.3)
    x = images(base, 2).double()
    prompts = model.prompts()
    fi, ft = lora_outputs(model, x, prompts)
    mi, mt = lora_outputs(model.merge(), x, prompts)
    zi, _ = lora_outputs(base, x, prompts)
    assert (fi - mi).abs().max() <= 1e-9 * fi.norm(dim=-1).max()
    assert (ft - mt).abs().max() <= 1e-9 * ft.norm(dim=-1).max()
    assert (fi - zi).abs().max() > 1e-3


def test_lora_updates_land_on_their_own_slice(backbone):
    model = LoRA(backbone.copy(), CLASSES, LoRAConfig(targets=("k",)))
    randomize(model.trainable_parameters())
    merged = model.merge()
    d = backbone.vision_width
    before = backbone.image_blocks[0].attn.in_proj_weight
    after = merged.image_blocks[0].attn.in_proj_weight
    wrapper = model.lora_modules()[0]
    diff = after - before  # (3D, D)
    assert diff[:d].abs().max() == 0 and diff[2 * d:].abs().max() == 0  # q and v untouched
    assert torch.allclose(diff[d:2 * d], wrapper.delta_weight("k"), atol=1e-6)
    manual = wrapper.scale * wrapper.lora_B["k"] @ wrapper.lora_A["k"]
    assert torch.allclose(wrapper.delta_weight("k"), manual)


def test_lora_scaling_and_iterations_resolve(backbone):
    assert LoRAConfig(r=2, alpha=1).scale == pytest.approx(1 / math.sqrt(2))
    assert LoRAConfig(r=4, alpha=1, scaling="linear").scale == pytest.approx(0.25)
    cfg = LoRAConfig().resolve(ctx(backbone, shots=4))
    assert cfg.iterations == 2000 and cfg.optimizer == "adamw" and cfg.min_lr == 1e-6
    model = LoRA(backbone, CLASSES)
    assert model.prompts()[0] == "a photo of a red."  # fixed template, whatever the dataset's
    assert all(float(w.lora_B[t].detach().abs().sum()) == 0 for w in model.lora_modules() for t in w.targets)


def test_lora_dropout_only_in_training(backbone):
    model = LoRA(backbone, CLASSES)
    randomize(model.trainable_parameters())
    x = images(backbone)
    model.train()
    with torch.no_grad():
        a, b = model.encode_image(x), model.encode_image(x)
    assert (a - b).abs().max() > 1e-4  # dropout on the LoRA path
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), model.encode_image(x))
    assert not backbone.image_blocks[0].attn.attn.training  # CLIP's attention stays in eval


@pytest.mark.parametrize(
    "bad", [{"r": -1}, {"r": 0}, {"dropout": 1.5}, {"targets": ["x"]}, {"scaling": "sq"}]
)
def test_lora_bad_config_names_the_field(bad):
    with pytest.raises(ConfigError) as e:
        build_config(LoRAConfig, bad)
    assert e.value.field == next(iter(bad))


# ----------------------------------------------------------------------------- CLIP-Adapter
def test_clip_adapter_blend_and_gradients(backbone, tiny_backbone):
    model = CLIPAdapter(backbone, CLASSES)
    assert model.adapter.down.weight.shape == (backbone.embed_dim // 4, backbone.embed_dim)
    assert model.adapter.down.bias is None and model.adapter.up.bias is None
    x = images(backbone)
    with torch.no_grad():
        f = tiny_backbone.encode_image(x)
        expected = 0.2 * torch.relu(model.adapter.up(torch.relu(model.adapter.down(f)))) + 0.8 * f
        out = model.encode_image(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert (l2norm(out) - l2norm(f)).abs().max() > 1e-3
    model.train()
    loss = torch.nn.functional.cross_entropy(model.logits(x), torch.tensor([0, 1]))
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"adapter.down.weight", "adapter.up.weight"}


def test_clip_adapter_coop_recipe():
    cfg = CLIPAdapterConfig()
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.warmup_epochs) == ("sgd", 2e-3, 32, 1.0)
    bb = SimpleNamespace(info=SimpleNamespace(n_image_blocks=12, n_text_blocks=12, vision_width=768,
                                              text_width=512, embed_dim=512))
    assert cfg.resolve(ctx(bb, shots=16)).epochs == 200
    assert cfg.resolve(ctx(bb, shots=2)).epochs == 100
    assert cfg.resolve(ctx(bb, shots=1)).epochs == 50
    assert cfg.resolve(ctx(bb, shots=16, dataset="imagenet")).epochs == 50
    with pytest.raises(ConfigError, match="reduction"):
        build_config(CLIPAdapterConfig, {"reduction": 0})


# ----------------------------------------------------------------------------- MMA
def test_mma_matches_reference_branch_and_is_not_identity(backbone, tiny_backbone):
    model = MMA(backbone, CLASSES).eval()
    assert model.describe()["image_layers"] == [1, 2] and model.describe()["text_layers"] == [1, 2]
    x = images(backbone)
    # reference: the official block x + attn(ln_1 x) + mlp(ln_2 .) + scale * up(shared(down(ln_1 x)))
    with torch.no_grad():
        h = tiny_backbone.image_embed(x)
        for i, block in enumerate(tiny_backbone.image_blocks, start=1):
            ad, sh = model.visual_adapter[str(i)], model.shared_adapter[str(i)]
            y = 1e-3 * ad.up(torch.relu(sh(torch.relu(ad.down(block.ln_1(h))))))
            h = block(h) + y
        ref = tiny_backbone.image_project(tiny_backbone.image_pool(h))
        out = model.encode_image(x)
        zs = tiny_backbone.encode_image(x)
    assert torch.allclose(out, ref, atol=1e-6)
    assert (out - zs).abs().max() > 0  # starts small, not zero
    randomize(model.trainable_parameters(), std=0.5)
    with torch.no_grad():
        assert (model.encode_image(x) - zs).abs().max() > 1e-3


def test_mma_gradient_scaling_and_shared_coupling(backbone):
    x = torch.randn(3, requires_grad=True)
    grad_scale(x, 0.25).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), 0.25))
    model = MMA(backbone, CLASSES)
    model.train()
    loss = torch.nn.functional.cross_entropy(model.logits(images(backbone)), torch.tensor([0, 1]))
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    # the 1/scale on the way out: adapter gradients are not shrunk by the 0.001
    assert model.visual_adapter["2"].up.bias.grad.abs().max() > 1e-4
    # one shared layer per block index, used by both towers
    blocks = [b for b in backbone.modules() if isinstance(b, MMABlock)]
    assert len(blocks) == 4 and len({id(b._shared) for b in blocks}) == 2


def test_mma_unequal_towers(tmp_path):
    cfg_path = tmp_path / "tiny-deep-image.json"
    cfg_path.write_text(
        '{"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, '
        '"patch_size": 8}, "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 48, "heads": 2, '
        '"layers": 2}}'
    )
    bb = load_backbone(str(cfg_path), None)
    cfg = MMAConfig().resolve(ctx(bb))
    assert cfg.image_layers == (2, 4) and cfg.text_layers == (1, 2)
    model = MMA(bb, CLASSES, cfg)
    assert model.image_to_text == {2: 1, 3: 2, 4: 2}
    assert model.visual_adapter["2"].down.in_features == 64 and model.text_adapter["1"].down.in_features == 48
    assert model.logits(images(bb)).shape == (2, 4)


def test_mma_bad_ranges_name_field_and_range(backbone):
    with pytest.raises(ConfigError, match=r"image_layers.*<= 2"):
        MMAConfig(image_layers=(1, 3)).resolve(ctx(backbone))
    with pytest.raises(ConfigError, match=r"text_layers.*<= 2"):
        MMA(backbone, CLASSES, MMAConfig(text_layers=(2, 5)))
    with pytest.raises(ConfigError, match=r"layers.*12"):
        build_config(MMAConfig, {"layers": [0, 12]})
    with pytest.raises(ConfigError, match="dim"):
        build_config(MMAConfig, {"dim": -2})


# ----------------------------------------------------------------------------- Tip-Adapter-F
class Fixed(Dataset):
    """Fixed (image, label) pairs: deterministic 'augmentation', so keys are exactly computable."""

    def __init__(self, x: torch.Tensor, y: list[int]):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError("the test split must never be read")

    def __len__(self):
        raise AssertionError("the test split must never be read")


def tip_data(bb, shots: int = 2):
    n = len(CLASSES)
    train_y = [c for c in range(n) for _ in range(shots)]
    val_y = [c for c in range(n) for _ in range(2)]
    return SimpleNamespace(train=Fixed(images(bb, len(train_y), seed=3), train_y),
                           val=Fixed(images(bb, len(val_y), seed=4), val_y), test=Untouchable())


def test_tip_adapter_cache_search_and_state(backbone):
    cfg = TipAdapterConfig(shots=2, search_steps=(20, 10))
    model = TipAdapter(backbone, CLASSES, cfg)
    assert model.tasks == ("classification",) and model.num_trainable() == backbone.embed_dim * 4 * 2
    data = tip_data(backbone)
    model.prepare(data)
    with torch.no_grad():
        f = backbone.encode_image(data.train.x)
        vf = l2norm(backbone.encode_image(data.val.x))
    assert torch.allclose(model.keys.weight, l2norm(f), atol=1e-5)  # mean of identical views
    assert torch.equal(model.cache_values.argmax(1), torch.tensor(data.train.y))
    # the searched pair is the first best of the official grid on val
    text = l2norm(model.class_text_features())
    vy = torch.tensor(data.val.y)
    best, pick = -1.0, None
    for beta in search_grid(7.0, 20):
        for alpha in search_grid(3.0, 10):
            cache = torch.exp(-beta * (1 - vf @ model.keys.weight.t())) @ model.cache_values
            logits = 100 * vf @ text.t() + alpha * cache
            acc = float((logits.argmax(1) == vy).float().mean()) * 100
            if acc > best:
                best, pick = acc, (beta, alpha)
    assert model.beta.item() == pytest.approx(pick[0], abs=1e-5)
    assert model.alpha.item() == pytest.approx(pick[1], abs=1e-5)
    # state carries keys, cache values and the searched alpha/beta
    state = model.trainable_state_dict()
    assert {"keys.weight", "cache_values", "alpha", "beta"} <= set(state)
    fresh = TipAdapter(backbone, CLASSES, cfg)
    fresh.load_trainable_state_dict(state)
    model.eval()
    fresh.eval()
    x = images(backbone, 3, seed=9)
    with torch.no_grad():
        assert torch.allclose(fresh.logits(x), model.logits(x))
        zs = fresh.backbone.logit_scale * l2norm(backbone.encode_image(x)) @ text.t()
        assert (l2norm(fresh.logits(x)) - l2norm(zs)).abs().max() > 1e-3


def test_tip_adapter_searches_again_after_training(backbone):
    model = TipAdapter(backbone, CLASSES, TipAdapterConfig(shots=2, search_steps=(5, 5)))
    data = tip_data(backbone)
    model.prepare(data)
    calls = []
    original = model.search_hp
    model.search_hp = lambda: (calls.append(1), original())
    model.train()
    loss = torch.nn.functional.cross_entropy(model.logits(images(backbone, 2)), torch.tensor([0, 1]))
    loss.backward()
    assert model.keys.weight.grad is not None and model.keys.weight.grad.abs().max() > 0
    model.eval()
    assert calls == []  # switching modes never searches implicitly
    model.after_fit(data)  # the runner calls this once training ends
    assert calls == [1]


def test_tip_adapter_needs_shots(backbone):
    with pytest.raises(ConfigError, match="shots"):
        TipAdapter(backbone, CLASSES)
    assert dataclasses.replace(TipAdapterConfig(), shots=None).resolve(ctx(backbone, shots=4)).shots == 4
    with pytest.raises(ConfigError, match="search_steps"):
        build_config(TipAdapterConfig, {"search_steps": [0, 3]})
