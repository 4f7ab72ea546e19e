"""backbone.py: the open_clip 3.3.0 layout it relies on, loading routes, freezing, QuickGELU."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import TINY, TINY_CONFIG
from torch import nn

from peftbench import backbone as bb
from peftbench.backbone import block_parts, load_backbone, replace_submodule
from peftbench.errors import UsageError


def test_open_clip_version_is_the_pinned_one():
    assert open_clip.__version__ == "3.3.0"


def test_layout_assumptions_hold(tiny_backbone):
    m = tiny_backbone.model
    blk = m.visual.transformer.resblocks[0]
    for name in ("ln_1", "attn", "ls_1", "ln_2", "ls_2"):
        assert hasattr(blk, name)
    assert isinstance(blk.attn, nn.MultiheadAttention) and blk.attn.batch_first
    assert blk.attn.in_proj_weight.shape == (3 * 64, 64)
    for name in ("c_fc", "gelu", "c_proj"):
        assert hasattr(blk.mlp, name)
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "proj"):
        assert hasattr(m.visual, name)
    for name in ("token_embedding", "positional_embedding", "ln_final", "text_projection", "attn_mask"):
        assert hasattr(m, name)
    assert m.text_pool_type == "argmax"
    assert set(block_parts(blk)) == {"ln_1", "attn", "ln_2", "c_fc", "c_proj"}


def test_decomposed_paths_equal_open_clip(tiny_backbone):
    x = torch.randn(3, 3, 32, 32)
    tokens = tiny_backbone.tokenize(["a photo of a red star.", "a sketch of a dog", "x"])
    with torch.no_grad():
        assert torch.equal(tiny_backbone.encode_image(x), tiny_backbone.model.encode_image(x))
        assert torch.equal(tiny_backbone.encode_text(tokens), tiny_backbone.model.encode_text(tokens))


def test_backbone_is_frozen_and_stays_in_eval(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not any(m.training for m in backbone.modules())


def test_inserted_modules_follow_train_mode_clip_modules_do_not(backbone):
    wrapper = nn.Sequential(backbone.image_blocks[0].ln_1, nn.Dropout(0.5))
    replace_submodule(backbone.image_blocks[0], "ln_1", wrapper)
    backbone.train()
    assert wrapper.training and wrapper[1].training
    assert not backbone.image_blocks[0].attn.training
    backbone.eval()
    assert not wrapper.training


def test_weightless_backbone_is_reproducible():
    a, b = load_backbone(TINY, None), load_backbone(TINY, None)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


def test_local_checkpoint_file_and_config_path(tmp_path, tiny_backbone):
    ckpt = tmp_path / "weights.pt"
    with torch.no_grad():
        sd = {k: v + 0.01 for k, v in tiny_backbone.model.state_dict().items()}
    torch.save(sd, ckpt)
    cfg = tmp_path / "my-arch.json"
    cfg.write_text(TINY_CONFIG.read_text())
    loaded = load_backbone(str(cfg), str(ckpt))
    assert torch.equal(loaded.model.visual.proj, sd["visual.proj"])
    assert loaded.info.pretrained == str(ckpt)


@pytest.mark.parametrize(
    "name, pretrained, fragment",
    [
        ("ViT-B-17", None, "did you mean 'ViT-B-16'"),
        (TINY, "/no/such/file.pt", "weights file not found"),
        ("ViT-B-32", "laion9000", "unknown pretrained tag"),
        ("/no/such/config.json", None, "config file not found"),
    ],
)
def test_bad_backbone_input_is_one_clear_line(name, pretrained, fragment):
    with pytest.raises(UsageError, match=fragment) as e:
        load_backbone(name, pretrained)
    assert "\n" not in str(e.value)


def test_invalid_config_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_backbone(str(bad), None)


def test_openai_tags_force_quickgelu(monkeypatch):
    seen = {}

    def fake_create(arch, pretrained=None, device="cpu", force_quick_gelu=False, **kw):
        seen["quick_gelu"] = force_quick_gelu
        raise RuntimeError("Failed to download weights for tag 'openai': offline")

    monkeypatch.setattr(bb.open_clip, "create_model_and_transforms", fake_create)
    with pytest.raises(UsageError, match="--pretrained /path/to/"):
        load_backbone("ViT-B-16", "openai")
    assert seen["quick_gelu"] is True  # never the silent GELU mismatch
    with pytest.raises(UsageError):
        load_backbone("ViT-B-16", "laion2b_s34b_b88k")
    assert seen["quick_gelu"] is False


def test_quickgelu_architecture_name_is_recorded(tmp_path):
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["quick_gelu"] = True
    path = tmp_path / "tiny-qg-quickgelu.json"
    path.write_text(json.dumps(cfg))
    b = load_backbone(str(path), None)
    assert b.info.quick_gelu
    assert isinstance(b.image_blocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
