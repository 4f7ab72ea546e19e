"""MAIL and MAIL++: parameter counts, identity at init, exact merge, layer ranges, bad input, export.

Random agent values (`randomize`) are non-identity and not shrunk to pass: every agent tensor moves
by 0.5 x its std (or 0.5 where it is constant, as the contract tests do), and every zero-initialised
bridge up-projection is drawn so that its bridge moves the scale it feeds by N(0, 0.5^2) per channel,
as much as the agents themselves move.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import TINY, TINY_CONFIG
from typer.testing import CliRunner

from peftbench.backbone import load_backbone
from peftbench.cli import app
from peftbench.config import RunContext
from peftbench.errors import ConfigError, UsageError
from peftbench.method import l2norm
from peftbench.methods.mail import MAIL, MAILConfig
from peftbench.methods.mail_pp import BRIDGES, MAILPP, MAILPPConfig
from peftbench.results import ResultStore
from peftbench.runner import RunSpec, execute
from peftbench.task import DataEnv

CLASSES = ["red square", "green circle"]
BRIDGE_UPS = (  # (source of the code, down-projection, up-projection)
    ("text_scale", "down", "up"),
    ("meta", "meta_text_down", "meta_text_up"),
    ("meta", "meta_image_down", "meta_image_up"),
    ("meta", "meta_text_down", "meta_text_shift_up"),
    ("meta", "meta_image_down", "meta_image_shift_up"),
)


def randomize(model: MAIL, seed: int = 2) -> None:
    """Random non-initial values for every trainable tensor (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=g).to(t.dtype)

    with torch.no_grad():
        ups = {up for _, _, up in BRIDGE_UPS}
        for pos in model.agents.values():
            for name, p in pos.named_parameters():
                if name not in ups:
                    p.add_(0.5 * noise(p) * (p.std() if p.std() > 0 else 1))
            for src, down, up in BRIDGE_UPS:
                if hasattr(pos, up):
                    code = getattr(pos, src) @ getattr(pos, down)  # (r,)
                    getattr(pos, up).copy_(noise(getattr(pos, up)) * 0.5 / code.norm())
        for p in (model.backbone.image_projection, model.backbone.text_projection):
            if p.requires_grad:
                p.add_(0.5 * noise(p) * p.std())


def images(n: int, size: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def embeddings(model, x):
    """Unnormalised (image, text) embeddings of a method or of a merged plain backbone."""
    if isinstance(model, MAIL):
        return model.encode_image(x), model.encode_text(model.prompts())
    return model.encode_image(x), model.encode_text(model.tokenize([f"a photo of a {c}." for c in CLASSES]))


def ctx(backbone, task="classification", dataset="synth") -> RunContext:
    i = backbone.info
    return RunContext(task, dataset, 2, 1, i.n_image_blocks, i.n_text_blocks, i.vision_width, i.text_width,
                      i.embed_dim)


def mail_count(n_layers: int, w_t: int, d_v: int, emb: int, r: int) -> int:
    """MAIL's agents and bridges, every layer bridged (mail.py's docstring formula)."""
    return (4 * n_layers + 1) * (2 * w_t + 2 * d_v + r * (w_t + d_v)) + 4 * emb + 2 * r * emb


def mail_pp_extra(n_layers: int, w_t: int, d_v: int, emb: int, r: int) -> int:
    """MAIL++'s meta agents and meta bridges at the defaults (mail_pp.py's docstring formula)."""
    return (4 * n_layers + 1) * (w_t + 3 * w_t * r + r * d_v) + (emb + 3 * emb * r + r * emb)


# ----------------------------------------------------------------------------- counts
def agent_count(model: MAIL) -> int:
    return sum(p.numel() for p in model.agents.parameters())


def test_counts_vit_b32():
    bb = load_backbone("ViT-B-32", None)
    proj = bb.image_projection.numel() + bb.text_projection.numel()
    assert proj == 655_360
    off = MAIL(bb.copy(), CLASSES, MAILConfig(rank=8, train_projections=False))
    assert off.num_trainable() == 637_440 == mail_count(12, 512, 768, 512, 8)
    pp = MAILPP(bb, CLASSES, MAILPPConfig(rank=8))  # in place: the last use of this backbone
    assert pp.num_trainable() == 637_440 + mail_pp_extra(12, 512, 768, 512, 8) + proj == 1_582_592 + proj
    assert pp.num_trainable() - agent_count(pp) == proj  # the projections are counted


def test_vit_b16_counts_and_merge():
    """ViT-B/16 (random weights): counts, and merged == unmerged with random non-identity values."""
    bb = load_backbone("ViT-B-16", None)
    torch.manual_seed(0)  # the W_down draws: the fp32 error varies with them (1.5e-6 to 6.6e-6 seen)
    model = MAIL(bb.copy(), CLASSES, MAILConfig(rank=32)).eval()
    assert model.num_trainable() == 2_822_656
    assert agent_count(model) == 2_167_296 == mail_count(12, 512, 768, 512, 32)
    randomize(model)
    x = images(2, 224)
    with torch.no_grad():
        zs = l2norm(bb.encode_image(x))
        img, txt = embeddings(model, x)
        m_img, m_txt = embeddings(model.merge(), x)
        assert (l2norm(img) - zs).abs().max() > 1e-3  # the values really move the model
        assert rel(m_img, img) <= 1e-5  # fp32, image side: rectangular projection (768 x 512)
        fp32_text = rel(m_txt, txt)  # square 512 x 512 text projection: reported, not asserted
        model = model.double()
        img, txt = embeddings(model, x.double())
        m_img, m_txt = embeddings(model.merge(), x.double())
    assert rel(m_img, img) <= 1e-9 and rel(m_txt, txt) <= 1e-9
    print(f"ViT-B/16 MAIL merge: fp64 image {rel(m_img, img):.1e}, text {rel(m_txt, txt):.1e}; "
          f"fp32 text {fp32_text:.2e}")
    pp = MAILPP(bb, CLASSES, MAILPPConfig(rank=32))  # in place: the last use of this backbone
    assert pp.num_trainable() == 2_167_296 + mail_pp_extra(12, 512, 768, 512, 32) + 655_360
    assert pp.num_trainable() == 5_871_104 + 655_360


# ----------------------------------------------------------------------------- identity and merge
VARIANTS = [("mail", {})] + [("mail_pp", {"bridge": b}) for b in BRIDGES]
VARIANTS.append(("mail_pp", {"bridge_shifts": True}))


def build(backbone, name: str, **kw) -> MAIL:
    cls, cfg_cls = (MAIL, MAILConfig) if name == "mail" else (MAILPP, MAILPPConfig)
    cfg = cfg_cls(**kw).resolve(ctx(backbone))
    torch.manual_seed(0)  # the bridges' down-projection draws
    return cls(backbone, CLASSES, cfg)


@pytest.mark.parametrize("name,kw", VARIANTS)
def test_identity_at_init(name, kw, backbone, tiny_backbone):
    model = build(backbone, name, **kw).eval()
    x = images(3, 32)
    with torch.no_grad():
        img, txt = embeddings(model, x)
        ref_img, ref_txt = embeddings(tiny_backbone, x)
        logits = model.logits(x)
        ref = tiny_backbone.logit_scale * l2norm(ref_img) @ l2norm(ref_txt).t()
    assert (l2norm(img) - l2norm(ref_img)).abs().max() <= 1e-6
    assert (l2norm(txt) - l2norm(ref_txt)).abs().max() <= 1e-6
    assert (logits - ref).abs().max() / ref.abs().max() <= 1e-6


@pytest.mark.parametrize("name,kw", VARIANTS)
def test_merge_exact_tiny(name, kw, backbone, tiny_backbone):
    model = build(backbone, name, **kw).eval()
    randomize(model)
    x = images(3, 32)
    with torch.no_grad():
        img, txt = embeddings(model, x)
        merged = model.merge()
        m_img, m_txt = embeddings(merged, x)
        zs_img, zs_txt = embeddings(tiny_backbone, x)
        assert (l2norm(img) - l2norm(zs_img)).abs().max() > 1e-3
        assert (l2norm(txt) - l2norm(zs_txt)).abs().max() > 1e-3
        # fp32: both projections are rectangular on the tiny config (64x32, 48x32)
        assert rel(m_img, img) <= 1e-5 and rel(m_txt, txt) <= 1e-5
        model = model.double()
        img, txt = embeddings(model, x.double())
        merged = model.merge()
        m_img, m_txt = embeddings(merged, x.double())
    assert rel(m_img, img) <= 1e-9 and rel(m_txt, txt) <= 1e-9
    assert type(merged.model) is type(tiny_backbone.model)
    ref = {k: v.shape for k, v in tiny_backbone.model.state_dict().items()}
    assert {k: v.shape for k, v in merged.model.state_dict().items()} == ref
    assert not any(getattr(m, "_peftbench_owned", False) for m in merged.modules())
    assert not any(p.requires_grad for p in merged.parameters())


def test_attention_agent_acts(backbone, tiny_backbone):
    """The agent after the attention output really acts (a hook on out_proj would never fire)."""
    model = build(backbone, "mail").eval()
    x = images(2, 32)
    with torch.no_grad():
        shift = model.agents["t1_v1_attn"].image_shift
        shift.copy_(torch.randn(shift.shape, generator=torch.Generator().manual_seed(3)))  # not uniform:
        # a shift equal on every channel would be cancelled by the LayerNorms that follow
        assert (model.encode_image(x) - tiny_backbone.encode_image(x)).abs().max() > 1e-3
        assert rel(model.merge().encode_image(x), model.encode_image(x)) <= 1e-5


def test_unequal_depths(tmp_path):
    """Image tower 4 blocks, text tower 2: text block j couples with image block 2j."""
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["vision_cfg"]["layers"] = 4
    path = tmp_path / "tiny-deep-image.json"
    path.write_text(json.dumps(cfg))
    bb = load_backbone(str(path), None)
    model = build(bb.copy(), "mail_pp").eval()
    pairs = model.describe()["layer_pairs"]
    assert pairs == [[1, None, 1], [1, 1, 2], [2, None, 3], [2, 2, 4]]
    assert not model.agents["t0_v1_ln_1"].bridged and model.agents["t1_v2_ln_1"].bridged
    randomize(model)
    model = model.double()
    x = images(2, 32, torch.float64)
    with torch.no_grad():
        img, txt = embeddings(model, x)
        m_img, m_txt = embeddings(model.merge(), x)
    assert rel(m_img, img) <= 1e-9 and rel(m_txt, txt) <= 1e-9


# ----------------------------------------------------------------------------- structure and config
def test_bridge_range_and_agent_range(backbone):
    info = backbone.info
    w, d, e, r = info.text_width, info.vision_width, info.embed_dim, 4
    model = build(backbone.copy(), "mail", rank=r, start_layer=2, end_layer=2, train_projections=False)
    bridged = {k for k, p in model.agents.items() if p.bridged}
    assert bridged == {f"t2_v2_{s}" for s in ("ln_1", "attn", "ln_2", "mlp")} | {"top_ln", "top_proj"}
    # layer 1 unbridged: 4 positions of agents only
    assert model.num_trainable() == mail_count(2, w, d, e, r) - 4 * r * (w + d)
    short = build(backbone, "mail", rank=r, agent_end_layer=1, train_projections=False)
    assert set(short.agents) == {f"t1_v1_{s}" for s in ("ln_1", "attn", "ln_2", "mlp")}


def test_shared_down_init(backbone, tiny_backbone):
    model = build(backbone, "mail")
    downs = [p.down for k, p in model.agents.items() if not k.startswith("top")]
    assert all(torch.equal(downs[0], dn) for dn in downs[1:])
    assert not torch.equal(downs[0], model.agents["top_ln"].down)  # the top positions draw their own
    w = backbone.text_width
    assert abs(float(downs[0].detach().std()) - w**-0.5) < 0.3 * w**-0.5
    own = build(tiny_backbone.copy(), "mail", shared_down_init=False)
    assert not torch.equal(own.agents["t1_v1_ln_1"].down, own.agents["t2_v2_ln_1"].down)


def test_resolve_recipes(backbone):
    c = MAILConfig().resolve(ctx(backbone, "ucdr"))
    assert (c.rank, c.optimizer, c.lr, c.schedule, c.final_lr_ratio) == (8, "adam", 2e-4, "exponential", 1e-3)
    assert MAILConfig(lr=1e-3).resolve(ctx(backbone, "ucdr")).lr == 1e-3  # a user's override is kept
    c = MAILConfig().resolve(ctx(backbone))
    assert (c.rank, c.optimizer, c.lr, c.epochs, c.batch_size) == (32, "adamw", 1.5e-5, 10, 4)
    assert (c.start_layer, c.end_layer, c.agent_end_layer) == (1, 2, 2)
    assert MAILConfig().resolve(ctx(backbone, dataset="dtd")).rank == 12
    assert MAILConfig().resolve(ctx(backbone, dataset="imagenet")).epochs == 5


@pytest.mark.parametrize(
    "field,kw",
    [
        ("rank", {"rank": 0}),
        ("rank", {"rank": 33}),  # above the narrowest bridged width (embed_dim 32)
        ("start_layer", {"start_layer": 3}),
        ("start_layer", {"start_layer": 0}),
        ("end_layer", {"end_layer": 5}),
        ("end_layer", {"start_layer": 2, "end_layer": 1}),
        ("agent_end_layer", {"agent_end_layer": 3}),
        ("bridge", {"bridge": "both"}),
    ],
)
def test_bad_config_names_the_field(field, kw, backbone):
    with pytest.raises(ConfigError) as e:
        MAILPPConfig(**kw).resolve(ctx(backbone))
    assert field in str(e.value)
    if field != "bridge" and kw.get("rank") != 0 and kw.get("start_layer") != 0:
        with pytest.raises(ConfigError, match=field):  # building without resolve checks it too
            MAIL(backbone, CLASSES, MAILConfig(**kw))


def test_projection_shift_needs_full_column_rank(tmp_path):
    """embed_dim > width: the projection shift cannot be folded exactly; merge() refuses."""
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["embed_dim"] = 72
    path = tmp_path / "tiny-wide-embed.json"
    path.write_text(json.dumps(cfg))
    bb = load_backbone(str(path), None)
    model = MAIL(bb, CLASSES, MAILConfig(rank=4))
    with torch.no_grad():
        model.agents["top_proj"].text_shift.fill_(0.1)
    with pytest.raises(UsageError, match="full column rank"):
        model.merge()


# ----------------------------------------------------------------------------- runner and export
@pytest.fixture
def finished_run(tmp_path, folder_dataset):
    env = DataEnv(data_root=folder_dataset, split_dir=tmp_path / "splits")
    store = ResultStore(tmp_path / "results")
    # lr raised so two steps move the agents visibly (the round trip must not pass on an identity)
    spec = RunSpec(method="mail", dataset="imagefolder", backbone=TINY, pretrained=None, shots=2,
                   method_overrides=(("iterations", 2), ("lr", 0.05)))
    outcome = execute(spec, store, env, progress=False)
    assert outcome.status == "ok", outcome.record.get("traceback")
    return store, store.latest(outcome.config_hash)  # as stored (names its state file)


def test_run_records_merged_and_export_round_trip(finished_run, tmp_path, tiny_backbone):
    store, record = finished_run
    assert record["merged"] is True
    assert record["params"]["trainable"] > 0
    out = tmp_path / "model.safetensors"
    res = CliRunner().invoke(app, ["export", record["config_hash"][:10], "--results-dir", str(store.root),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    open_clip.add_model_config(TINY_CONFIG)
    stock, _, _ = open_clip.create_model_and_transforms("tiny-test", pretrained=str(out))
    stock.eval()
    cfg = MAILConfig(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in record["resolved"]["method"]["config"].items()})
    model = MAIL(tiny_backbone.copy(), CLASSES, cfg)
    model.load_trainable_state_dict(store.load_state(record))
    model.eval()
    x = images(2, 32)
    tokens = open_clip.get_tokenizer("tiny-test")(model.prompts())
    with torch.no_grad():
        ours_img, ours_txt = model.encode_image(x), model.encode_text(model.prompts())
        assert rel(stock.encode_image(x), ours_img) <= 1e-5
        assert rel(stock.encode_text(tokens), ours_txt) <= 1e-5
        assert (l2norm(ours_img) - l2norm(tiny_backbone.encode_image(x))).abs().max() > 1e-3


def test_export_errors(finished_run, tmp_path):
    store, record = finished_run
    runner = CliRunner()

    def export(prefix: str):
        res = runner.invoke(app, ["export", prefix, "--results-dir", str(store.root), "--out",
                                  str(tmp_path / "m.pt")])
        assert res.exit_code == 2
        return " ".join(res.output.split())

    assert "no run with hash prefix" in export("zzzz")
    base = {k: v for k, v in record.items() if k not in ("state_file", "_path")}
    h = record["config_hash"]
    store.append({**base, "config_hash": "f" * 63 + "0", "record_id": "a"})  # ok, but no state
    assert "no saved trainable state" in export("f" * 63)
    store.append({**base, "config_hash": "e" * 64, "record_id": "b", "status": "failed", "error": "boom"})
    assert "failed" in export("eeee") and "boom" in export("eeee")
    spec = {**base["spec"], "method": "zeroshot"}
    store.append({**base, "config_hash": "d" * 64, "record_id": "c", "spec": spec})
    assert "cannot be merged" in export("dddd")
    store.append({**base, "config_hash": h[:8] + ("0" if h[8] != "0" else "1") * 56, "record_id": "d"})
    assert "ambiguous" in export(h[:8])
