"""MAIL: multimodal agent layers with a text-to-image bridge (Chen, Fang, Xue, NeurIPS 2025).

Ported from the authors' released code (pSGAme/MAIL for retrieval, pSGAme/MAIL-for-Classification
for classification; read, not copied; see /work/shared/spec/methods.md, "MAIL").

An *agent layer* is a per-channel affine map y = x * a + b (a initialised to 1, b to 0), broadcast
over tokens and batch. MAIL puts one at every *position*, paired across the two towers:

- in every residual block: after ln_1, after the attention output (after out_proj, before the
  residual add), after ln_2 and after the MLP output (after c_proj, before the residual add);
- at the top: after ln_post / ln_final, and after the final projections.

On ViT-B that is 4 x 12 + 2 = 50 paired positions. Each position holds a text agent (a_t, b_t), an
image agent (a_v, b_v) and, inside the bridged layer range, a linear bottleneck bridge from the text
scale to the image scale:

    image scale = a_v + (a_t @ W_down) @ W_up,   W_down (w_t, r) ~ N(0, 1/w_t),   W_up (r, d_v) = 0

(no bias, no activation; shifts are not bridged; nothing flows image to text). The model therefore
starts exactly as CLIP, and every agent folds exactly into the adjacent LayerNorm or Linear, so the
deployed model is a plain CLIP (:meth:`MAIL.merge`).

Trainable: all agents and bridges, plus (default, as in the official runs) CLIP's two projection
matrices. Count, for towers of equal depth L, text width w_t, image width d_v, joint width E, rank r,
every layer bridged and agents everywhere (the defaults):

    (4L + 1) * (2 w_t + 2 d_v + r (w_t + d_v))  +  (4E + 2 r E)   [+ d_v E + w_t E with projections]

ViT-B/32 at r=8: 637,440 (1,292,800 with projections); ViT-B/16 at r=32: 2,167,296 (2,822,656).

Layer numbering: positions are indexed by text block j = 1..L_t; image block k belongs to layer
ceil(k L_t / L_v), and text block j is paired (bridged) with image block ceil(j L_v / L_t)
(`coupled_image_block`); on towers of equal depth both are the identity. The two top positions count
as the last layer. The bridge acts on positions whose layer lies in [start_layer, end_layer]; agents
exist on layers [1, agent_end_layer].

Template policy: "a photo of a {}." for every dataset (the official retrieval prompts; used for
classification too, whatever the dataset's hand-written template).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftbench.backbone import Backbone, block_parts, freeze, replace_submodule, restore_submodule
from peftbench.config import MethodConfig, RunContext, check
from peftbench.errors import ConfigError, UsageError
from peftbench.method import Method, check_range, coupled_image_block, map_range
from peftbench.registry import register_method

MAIL_TEMPLATE = "a photo of a {}."
BLOCK_SITES = ("ln_1", "attn", "ln_2", "mlp")  # the four positions inside a residual block, in order
TOP_SITES = ("ln_top", "proj")  # after ln_post / ln_final; after the final projections

# Retrieval recipe (pSGAme/MAIL, UCDR scripts): Adam lr 2e-4, weight decay 5e-4, lr * (1e-3)^(epoch/20).
RETRIEVAL_RECIPE: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 2e-4,
    "weight_decay": 5e-4,
    "schedule": "exponential",
    "final_lr_ratio": 1e-3,
}


@dataclass(frozen=True)
class MAILConfig(MethodConfig):
    """MAIL's options. Optimisation defaults are the classification recipe (MAIL-for-Classification);
    on the `ucdr` task, every recipe field still at its classification default takes the retrieval
    recipe's value (RETRIEVAL_RECIPE) in `resolve` (the UCDR task then fixes the run length)."""

    rank: int | None = (
        None  # bridge rank; None: 8 retrieval, 32 classification, 12 for DTD (official scripts)
    )
    start_layer: int | None = None  # first bridged layer (1-based, text-block numbering); None: 1 (official)
    end_layer: int | None = None  # last bridged layer; None: the last layer (official: all layers)
    agent_end_layer: int | None = None  # agents on layers 1..agent_end_layer; None: all (official)
    train_projections: bool = True  # train CLIP's two projection matrices (official runs: on)
    shared_down_init: bool = True  # every block position starts from one W_down draw (official: deep copies)
    # Classification recipe (MAIL-for-Classification): AdamW lr 1.5e-5, cosine, batch 4, 10 epochs
    # (ImageNet 5, set in resolve). Weight decay: not given by the spec; the Dassl default 5e-4.
    optimizer: str = "adamw"
    lr: float = 1.5e-5
    weight_decay: float = 5e-4
    batch_size: int = 4
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "rank", self.rank is None or self.rank >= 1, "must be >= 1")
        for name in ("start_layer", "end_layer", "agent_end_layer"):
            value = getattr(self, name)
            check(self, name, value is None or value >= 1, "must be >= 1 (layers are 1-based)")

    def resolve(self, ctx: RunContext) -> MAILConfig:
        """Rank, recipe and layer ranges from the task, dataset and tower depth."""
        changes: dict[str, Any] = {}
        dataset = ctx.dataset.lower()
        if self.rank is None:
            rank = 8 if ctx.task == "ucdr" else (12 if dataset == "dtd" else 32)
            # The default is capped at the narrowest bridged width (tiny backbones); explicit ranks are
            # validated literally.
            changes["rank"] = min(rank, ctx.text_width, ctx.vision_width, ctx.embed_dim)
        if ctx.task == "ucdr":
            base = {f.name: f.default for f in dataclasses.fields(type(self))}
            for name, value in RETRIEVAL_RECIPE.items():
                if getattr(self, name) == base[name]:
                    changes[name] = value
        elif self.epochs is None and self.iterations is None:
            changes["epochs"] = 5 if dataset == "imagenet" else 10
        depth = ctx.n_text_blocks
        start, end = map_range(1, 12, depth)  # the official "all layers", on this tower's depth
        if self.start_layer is None:
            changes["start_layer"] = start
        if self.end_layer is None:
            changes["end_layer"] = end
        if self.agent_end_layer is None:
            changes["agent_end_layer"] = end
        out = dataclasses.replace(self, **changes)
        out.validate(depth, ctx.text_width, ctx.vision_width, ctx.embed_dim)
        return out

    def validate(self, depth: int, text_width: int, vision_width: int, embed_dim: int) -> None:
        """Check ranges and rank against a backbone (raises ConfigError naming the field)."""
        narrowest = min(text_width, vision_width, embed_dim)
        check(
            self,
            "rank",
            self.rank is None or self.rank <= narrowest,
            f"must be <= the narrowest bridged width {narrowest} of this backbone",
        )
        start = 1 if self.start_layer is None else self.start_layer
        end = depth if self.end_layer is None else self.end_layer
        for name, value in (("start_layer", start), ("end_layer", end)):
            check(self, name, 1 <= value <= depth, f"must lie in 1..{depth} (text tower depth)")
        if start > end:
            raise ConfigError(
                "end_layer", f"bridged range [{start}, {end}] is empty: need start_layer <= end_layer"
            )
        check_range("end_layer", start, end, depth)
        agent_end = depth if self.agent_end_layer is None else self.agent_end_layer
        check(self, "agent_end_layer", 1 <= agent_end <= depth, f"must lie in 1..{depth} (text tower depth)")


# ------------------------------------------------------------------------------ agents
class AgentPosition(nn.Module):
    """One paired position: a text agent, an image agent (either may be absent where the towers'
    depths differ) and, when bridged, MAIL's text-to-image bridge on the scales.

    Trainable: text_scale/text_shift (w_t,), image_scale/image_shift (d_v,), down (w_t, r), up (r, d_v).
    """

    def __init__(
        self,
        text_dim: int | None,
        image_dim: int | None,
        rank: int,
        bridged: bool,
        down_init: torch.Tensor | None = None,
        down_std: float | None = None,
    ):
        super().__init__()
        self.text_dim, self.image_dim, self.rank = text_dim, image_dim, rank
        self.bridged = bridged and text_dim is not None and image_dim is not None
        if text_dim is not None:
            self.text_scale = nn.Parameter(torch.ones(text_dim))
            self.text_shift = nn.Parameter(torch.zeros(text_dim))
        if image_dim is not None:
            self.image_scale = nn.Parameter(torch.ones(image_dim))
            self.image_shift = nn.Parameter(torch.zeros(image_dim))
        if self.bridged:
            if down_init is None:
                down_init = torch.randn(text_dim, rank) * (down_std or text_dim**-0.5)
            self.down = nn.Parameter(down_init.clone())  # (w_t, r) ~ N(0, 1/w_t)
            self.up = nn.Parameter(torch.zeros(rank, image_dim))  # (r, d_v), zero: identity at init

    def text_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (w_t,)."""
        return self.text_scale, self.text_shift

    def image_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (d_v,); the scale receives the bridge."""
        scale = self.image_scale
        if self.bridged:
            scale = scale + (self.text_scale @ self.down) @ self.up  # (d_v,)
        return scale, self.image_shift


class _AgentWrap(nn.Module):
    """Applies a position's agent to the output of a wrapped CLIP module (LayerNorm, Linear, or
    nn.MultiheadAttention, whose output is a tuple (out, weights)). The position is referenced, not
    registered, so its parameters belong to the method alone."""

    def __init__(self, inner: nn.Module, position: AgentPosition, side: str):
        super().__init__()
        self.inner = inner
        self.side = side
        self.__dict__["_position"] = position  # not a submodule (see class docstring)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        pos = self.__dict__["_position"]
        scale, shift = pos.text_affine() if self.side == "text" else pos.image_affine()
        if isinstance(out, tuple):  # nn.MultiheadAttention: (out (B, N, D), weights)
            return (out[0] * scale + shift, *out[1:])
        return out * scale + shift  # (..., D)


@dataclass(frozen=True)
class _Wrap:
    """Where a wrapper sits: its dotted path under the backbone, the position key, the side, the kind."""

    path: str
    key: str
    side: str  # text | image
    kind: str  # ln | linear | attn


# ------------------------------------------------------------------------------ method
@register_method("mail")
class MAIL(Method):
    """MAIL (Chen, Fang, Xue, NeurIPS 2025): paired agent layers in both towers with a linear
    text-to-image bridge on the scales; merges exactly into a plain CLIP.

    Trainable: per-position text/image scales and shifts, the bridges (W_down, W_up), and by default
    CLIP's two projection matrices. See the module docstring for placement and counts.
    """

    Config = MAILConfig
    tasks = ("classification", "ucdr")
    mergeable = True
    identity_at_init = True
    template_policy = f"{MAIL_TEMPLATE!r} for every dataset (MAIL's released prompts)"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        config: MAILConfig | None = None,
        template: str = MAIL_TEMPLATE,
    ):
        super().__init__(backbone, classnames, config, template=MAIL_TEMPLATE)
        cfg = self.config
        info = backbone.info
        l_t, l_v = info.n_text_blocks, info.n_image_blocks
        cfg.validate(l_t, info.text_width, info.vision_width, info.embed_dim)
        self.rank = (
            cfg.rank if cfg.rank is not None else min(32, info.text_width, info.vision_width, info.embed_dim)
        )
        self.start_layer = cfg.start_layer or 1
        self.end_layer = cfg.end_layer or l_t
        self.agent_end_layer = cfg.agent_end_layer or l_t
        w_t, d_v, emb = info.text_width, info.vision_width, info.embed_dim

        # Slots pair a text block j with an image block k (1-based; either may be None where the depths
        # differ): image block k sits on layer ceil(k L_t / L_v) and is bridged from the text block that
        # couples with it (coupled_image_block); text blocks without an image partner get their own slot.
        partner = {coupled_image_block(j, l_v, l_t): j for j in range(1, l_t + 1)}  # image k -> text j
        slots = [(math.ceil(k * l_t / l_v), partner.get(k), k) for k in range(1, l_v + 1)]
        slots += [(j, j, None) for j in range(1, l_t + 1) if j not in partner.values()]
        slots.sort(key=lambda s: (s[0], s[2] or 0))

        shared_down = torch.randn(w_t, self.rank) * w_t**-0.5 if cfg.shared_down_init else None  # (w_t, r)
        self.agents = nn.ModuleDict()
        self._layers: dict[str, int] = {}
        self._slots: list[tuple[int, int | None, int | None]] = []
        for layer, j, k in slots:
            if layer > self.agent_end_layer:
                continue
            bridged = self.start_layer <= layer <= self.end_layer
            for site in BLOCK_SITES:
                key = f"t{j or 0}_v{k or 0}_{site}"
                self.agents[key] = self._make_position(
                    w_t if j else None, d_v if k else None, bridged, shared_down, text_width=w_t
                )
                self._layers[key] = layer
            self._slots.append((layer, j, k))
        if self.agent_end_layer >= l_t:  # the top positions count as the last layer
            bridged = self.start_layer <= l_t <= self.end_layer
            self.agents["top_ln"] = self._make_position(w_t, d_v, bridged, None, text_width=w_t)
            self.agents["top_proj"] = self._make_position(emb, emb, bridged, None, text_width=w_t)
            self._layers["top_ln"] = self._layers["top_proj"] = l_t

        if cfg.train_projections:
            for p in (backbone.image_projection, backbone.text_projection):
                for t in p.parameters() if isinstance(p, nn.Module) else [p]:
                    t.requires_grad_(True)
        self._wraps = self._install()

    def _make_position(
        self,
        text_dim: int | None,
        image_dim: int | None,
        bridged: bool,
        down_init: torch.Tensor | None,
        text_width: int,
    ) -> AgentPosition:
        """MAIL++ overrides this to add its meta agent."""
        return AgentPosition(text_dim, image_dim, self.rank, bridged, down_init, down_std=text_width**-0.5)

    def _install(self) -> list[_Wrap]:
        """Wrap the CLIP modules after which agents act (in place, through replace_submodule)."""
        bb = self.backbone
        names = {id(m): n for n, m in bb.named_modules()}
        wraps: list[_Wrap] = []

        def wrap(module: nn.Module, key: str, side: str, kind: str) -> None:
            path = names[id(module)]
            replace_submodule(bb, path, _AgentWrap(module, self.agents[key], side))
            wraps.append(_Wrap(path, key, side, kind))

        kinds = {"ln_1": "ln", "attn": "attn", "ln_2": "ln", "mlp": "linear"}
        for _, j, k in self._slots:
            for site in BLOCK_SITES:
                key = f"t{j or 0}_v{k or 0}_{site}"
                module_name = "c_proj" if site == "mlp" else site
                if j:
                    wrap(block_parts(bb.text_blocks[j - 1])[module_name], key, "text", kinds[site])
                if k:
                    wrap(block_parts(bb.image_blocks[k - 1])[module_name], key, "image", kinds[site])
        if "top_ln" in self.agents:
            wrap(bb.ln_final, "top_ln", "text", "ln")
            wrap(bb.ln_post, "top_ln", "image", "ln")
        return wraps

    # ------------------------------------------------------------------ forward
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E): CLIP's image path with agents; the top agent after the projection."""
        x = self.backbone.encode_image(images)  # (B, E)
        if "top_proj" in self.agents:
            scale, shift = self.agents["top_proj"].image_affine()
            x = x * scale + shift
        return x

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (N, E) through the text path with agents."""
        x = self.backbone.encode_text(self.backbone.tokenize(texts))  # (N, E)
        if "top_proj" in self.agents:
            scale, shift = self.agents["top_proj"].text_affine()
            x = x * scale + shift
        return x

    def describe(self) -> dict[str, Any]:
        info = self.backbone.info
        return {
            "rank": self.rank,
            "bridged_layers": [self.start_layer, self.end_layer],
            "agent_layers": [1, self.agent_end_layer],
            "n_positions": len(self.agents),
            "n_bridged_positions": sum(1 for p in self.agents.values() if p.bridged),
            "layer_pairs": [[layer, j, k] for layer, j, k in self._slots],  # (layer, text block, image block)
            "towers": {"text_blocks": info.n_text_blocks, "image_blocks": info.n_image_blocks},
            "train_projections": self.config.train_projections,
            "shared_down_init": self.config.shared_down_init,
            "template": MAIL_TEMPLATE,
        }

    # ------------------------------------------------------------------ merging
    def _plain_copy(self) -> Backbone:
        """A deep copy of the backbone with every wrapper replaced by the CLIP module it wraps."""
        bb = self.backbone
        wrappers = {w.path: bb.get_submodule(w.path) for w in self._wraps}
        try:
            for path, wrapper in wrappers.items():
                restore_submodule(bb, path, wrapper.inner)
            plain = copy.deepcopy(bb)
        finally:
            for path, wrapper in wrappers.items():
                replace_submodule(bb, path, wrapper)
        freeze(plain)
        return plain

    @torch.no_grad()
    def merge(self) -> Backbone:
        """Fold every agent into the adjacent CLIP weights; returns a plain Backbone of unchanged
        architecture (the open_clip state dict has exactly the original keys and shapes).

        After a LayerNorm: gamma' = s gamma, beta' = s beta + c. After out_proj / c_proj:
        W' = diag(s) W, b' = s b + c. After the bias-free projection P: P' = P diag(s), and the shift
        goes into the preceding LayerNorm's beta as delta with delta P = c / s (exact when P has full
        column rank, i.e. embed_dim <= width; solved in float64 and checked, never approximated).
        """
        plain = self._plain_copy()
        for w in self._wraps:
            pos = self.agents[w.key]
            scale, shift = pos.text_affine() if w.side == "text" else pos.image_affine()
            module = plain.get_submodule(w.path)
            if w.kind == "ln":
                _fold_rows(module.weight, module.bias, scale, shift)
            elif w.kind == "attn":
                _fold_rows(module.out_proj.weight, module.out_proj.bias, scale, shift)
            else:
                _fold_rows(module.weight, module.bias, scale, shift)
        if "top_proj" in self.agents:
            pos = self.agents["top_proj"]
            _fold_projection(plain, "image", *pos.image_affine())
            _fold_projection(plain, "text", *pos.text_affine())
        return plain


def _fold_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor
) -> None:
    """y = (x W^T + b) * s + c  ->  W' = diag(s) W, b' = s b + c (also LayerNorm: gamma, beta).

    `weight` is (D_out, D_in) for a Linear or (D,) for a LayerNorm; folded in place."""
    s = scale.to(weight.dtype)
    if weight.dim() == 2:
        weight.mul_(s[:, None])  # (D_out, D_in)
    else:
        weight.mul_(s)  # (D,)
    if bias is None:
        raise UsageError("cannot fold an agent shift: the wrapped layer has no bias")
    bias.mul_(s).add_(shift.to(bias.dtype))


def _fold_projection(plain: Backbone, side: str, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Fold y = (p @ P) * s + c into P and the LayerNorm before it (see MAIL.merge)."""
    ln = plain.ln_post if side == "image" else plain.ln_final
    proj = plain.image_projection if side == "image" else plain.text_projection
    if isinstance(proj, nn.Linear):  # y = p W^T + b: the shift has a bias to go to
        _fold_rows(proj.weight, proj.bias if proj.bias is not None else None, scale, shift)
        return
    s = scale.to(torch.float64)
    c = shift.to(torch.float64)
    if bool(((s == 0) & (c != 0)).any()):
        raise UsageError(
            f"cannot fold the {side} projection agent exactly: a zero scale with a non-zero shift"
        )
    u = torch.where(s == 0, torch.zeros_like(c), c / torch.where(s == 0, torch.ones_like(s), s))  # (E,)
    p64 = proj.detach().to(torch.float64)  # (D, E)
    if bool((u != 0).any()):
        delta = u @ torch.linalg.pinv(p64)  # (D,): delta @ P = u when P has full column rank
        residual = (delta @ p64 - u).norm() / u.norm()
        if residual > 1e-8:
            raise UsageError(
                f"cannot fold the {side} projection shift exactly: projection {tuple(proj.shape)} does not "
                f"have full column rank (residual {residual:.2e}); embed_dim must be <= the tower's width"
            )
        ln.bias.add_(delta.to(ln.bias.dtype))
    proj.mul_(scale.to(proj.dtype)[None, :])  # (D, E): columns scaled
