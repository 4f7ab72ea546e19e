"""MAIL++: MAIL with a meta agent and bidirectional bridges (Chen, Fang, Xue, arXiv 2605.25479, 2026).

THIS IS AN INTERPRETATION OF AN ABSTRACT. Only the abstract is available ("bidirectional cross-modal
exchange through a meta agent layer, a meta-text bridge, and a meta-image bridge", re-parameterised
at inference like MAIL); no code has been released. The design below follows the interpretation in
/work/shared/spec/methods.md ("MAIL++"), not the authors' implementation, and numbers produced with
it must not be reported as the paper's method.

At every bridged position (see :mod:`peftbench.methods.mail` for positions and layer ranges), on top
of MAIL's text agent (a_t, b_t) and image agent (a_v, b_v):

- a meta agent m in R^{w_t} (w_t: the text width at that position, the joint width E at the
  projection position), initialised to ones like an agent scale (a zero meta agent with zero
  up-projections would leave every meta bridge without gradient forever);
- a meta-text bridge  B_t(m) = (m D_t) U_t,  D_t (w_t, r) ~ N(0, 1/w_t),  U_t (r, w_t) = 0;
- a meta-image bridge B_v(m) = (m D_v) U_v,  D_v (w_t, r) ~ N(0, 1/w_t),  U_v (r, d_v) = 0;

    text scale  = a_t + B_t(m)
    image scale = a_v + B_v(m) [+ (a_t W_down) W_up, MAIL's direct text-to-image bridge]

Gradients from both towers reach m, which makes the exchange bidirectional. With `bridge_shifts`
the codes m D_t and m D_v also feed zero-initialised up-projections (r, w_t) and (r, d_v) added to the
shifts. Everything starts as exactly CLIP and folds exactly like MAIL (the bridges only produce
per-channel scales and shifts).

Defaults (the spec's concrete starting point; no evidence here has argued for another):
`bridge = "meta+t2i"` (keeps MAIL as the special case the meta path adds to, so the ablation
"meta+t2i" vs "t2i" isolates the meta agent), `bridge_shifts = False` (MAIL bridges only scales; the
abstract does not mention shifts), meta bridge rank = MAIL's `rank`, one meta agent per position.

Ablation switch `bridge`: "none" (independent agents, SSF-like), "t2i" (= MAIL), "meta", "meta+t2i".

Trainable: MAIL's (agents, bridges, by default the two projections) plus, per bridged position,
w + 2 w r + r w + r d  (m, D_t, D_v, U_t, U_v; w = text width there, d = image width there), plus
r w + r d with `bridge_shifts`. With the defaults, on towers of equal depth L:

    count(MAIL++) = count(MAIL) + (4L + 1) (w_t + 3 w_t r + r d_v) + (E + 3 E r + r E)

ViT-B/32 at r=8: 637,440 + 945,152 = 1,582,592 (+655,360 projections);
ViT-B/16 at r=32: 2,167,296 + 3,703,808 = 5,871,104 (+655,360 projections).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftbench.config import check
from peftbench.registry import register_method

from .mail import MAIL, AgentPosition, MAILConfig

BRIDGES = ("none", "t2i", "meta", "meta+t2i")


@dataclass(frozen=True)
class MAILPPConfig(MAILConfig):
    """MAIL's options plus the bridge ablation switch and optional shift bridging (interpretation)."""

    bridge: str = "meta+t2i"  # none | t2i (= MAIL) | meta | meta+t2i; spec's default: meta + MAIL's bridge
    bridge_shifts: bool = False  # also bridge the shifts from the meta agent; spec's default: scales only

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "bridge", self.bridge in BRIDGES, f"must be one of {', '.join(BRIDGES)}")


class MetaAgentPosition(AgentPosition):
    """A MAIL position plus a meta agent with meta-text and meta-image bridges (see module docstring).

    Trainable (when meta-bridged): meta (w,), meta_text_down (w, r), meta_text_up (r, w),
    meta_image_down (w, r), meta_image_up (r, d) [, meta_text_shift_up (r, w), meta_image_shift_up (r, d)].
    """

    def __init__(
        self,
        text_dim: int | None,
        image_dim: int | None,
        rank: int,
        bridged: bool,
        down_init: torch.Tensor | None,
        down_std: float,
        t2i: bool,
        meta: bool,
        shifts: bool,
    ):
        super().__init__(text_dim, image_dim, rank, bridged and t2i, down_init, down_std)
        self.meta_bridged = meta and bridged and text_dim is not None and image_dim is not None
        self.bridge_shifts = shifts and self.meta_bridged
        if self.meta_bridged:
            self.meta = nn.Parameter(torch.ones(text_dim))  # (w,), ones: see module docstring
            self.meta_text_down = nn.Parameter(torch.randn(text_dim, rank) * down_std)  # (w, r)
            self.meta_text_up = nn.Parameter(torch.zeros(rank, text_dim))  # (r, w)
            self.meta_image_down = nn.Parameter(torch.randn(text_dim, rank) * down_std)  # (w, r)
            self.meta_image_up = nn.Parameter(torch.zeros(rank, image_dim))  # (r, d)
            if self.bridge_shifts:
                self.meta_text_shift_up = nn.Parameter(torch.zeros(rank, text_dim))  # (r, w)
                self.meta_image_shift_up = nn.Parameter(torch.zeros(rank, image_dim))  # (r, d)

    def text_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = super().text_affine()
        if self.meta_bridged:
            code = self.meta @ self.meta_text_down  # (r,)
            scale = scale + code @ self.meta_text_up  # (w,)
            if self.bridge_shifts:
                shift = shift + code @ self.meta_text_shift_up
        return scale, shift

    def image_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = super().image_affine()
        if self.meta_bridged:
            code = self.meta @ self.meta_image_down  # (r,)
            scale = scale + code @ self.meta_image_up  # (d,)
            if self.bridge_shifts:
                shift = shift + code @ self.meta_image_shift_up
        return scale, shift


@register_method("mail_pp")
class MAILPP(MAIL):
    """MAIL++ (arXiv 2605.25479) as INTERPRETED from its abstract (no code exists): MAIL plus a meta
    agent per position whose meta-text and meta-image bridges add to both towers' scales.

    Trainable: MAIL's parameters plus the meta agents and meta bridges (count in the module docstring).
    Starts as exactly CLIP; merges exactly into a plain CLIP.
    """

    Config = MAILPPConfig

    def _make_position(
        self,
        text_dim: int | None,
        image_dim: int | None,
        bridged: bool,
        down_init: torch.Tensor | None,
        text_width: int,
    ) -> AgentPosition:
        cfg = self.config
        return MetaAgentPosition(
            text_dim,
            image_dim,
            self.rank,
            bridged,
            down_init,
            text_width**-0.5,
            t2i=cfg.bridge in ("t2i", "meta+t2i"),
            meta=cfg.bridge in ("meta", "meta+t2i"),
            shifts=cfg.bridge_shifts,
        )

    def describe(self) -> dict:
        out = super().describe()
        out["interpretation"] = "MAIL++ from its abstract only (arXiv 2605.25479); no official code"
        out["bridge"] = self.config.bridge
        out["bridge_shifts"] = self.config.bridge_shifts
        out["n_meta_positions"] = sum(1 for p in self.agents.values() if getattr(p, "meta_bridged", False))
        return out
