"""LoRA on CLIP's attention (CLIP-LoRA; Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of
Vision-Language Models", CVPRW 2024; official code MaxZanella/CLIP-LoRA).

Every attention block of both towers gets a low-rank update on its query, key and value
projections: W_t' = W_t + scaling * B_t A_t for t in {q, k, v}, A_t (r, D) Kaiming-uniform,
B_t (D, r) zero (so the method is exactly zero-shot CLIP at step 0), with dropout on the LoRA
input path only. open_clip fuses q, k and v into one `in_proj_weight` (3D, D) whose row blocks
[0:D], [D:2D], [2D:3D] are q, k and v: the update of t lands on its own slice, both in the
forward pass (`attn_forward` with q/k/v deltas) and in `merge()`, which folds the three updates
into a copy of `in_proj_weight` and returns a plain CLIP of unchanged architecture.

Trainable: the A and B matrices only, 2 * r * D per target per block; ViT-B/16 with r = 2 on
q, k, v of both towers: 12 * 3 * 4 * (768 + 512) = 184,320.

Template policy: "a photo of a {}." for every dataset (as CLIP-LoRA does), not the dataset's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.backbone import (
    Backbone,
    attn_forward,
    block_parts,
    freeze,
    replace_submodule,
    restore_submodule,
)
from peftbench.config import MethodConfig, RunContext, check
from peftbench.method import Method
from peftbench.registry import register_method

TARGETS = ("q", "k", "v")
SCALINGS = ("sqrt", "linear")
TOWERS = ("both", "image", "text")


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """CLIP-LoRA defaults (MaxZanella/CLIP-LoRA: main.py arguments, lora.py, loralib/layers.py)."""

    r: int = 2  # main.py --r 2
    alpha: float = 1.0  # main.py --alpha 1
    dropout: float = 0.25  # main.py --dropout_rate 0.25 (on the LoRA input path only)
    scaling: str = "sqrt"  # loralib/layers.py: alpha / sqrt(r); "linear" = alpha / r (original LoRA)
    targets: tuple[str, ...] = ("q", "k", "v")  # main.py --params q k v
    towers: str = "both"  # main.py --encoder both
    iters_per_shot: int = 500  # main.py --n_iters 500; total = n_iters * shots (lora.py)
    template: str = "a photo of a {}."  # lora.py: one template for every dataset
    optimizer: str = "adamw"  # lora.py: torch.optim.AdamW
    lr: float = 2e-4  # main.py --lr 2e-4
    weight_decay: float = 1e-2  # lora.py: AdamW(weight_decay=1e-2)
    betas: tuple[float, float] = (0.9, 0.999)  # lora.py: AdamW(betas=(0.9, 0.999))
    batch_size: int = 32  # main.py --batch_size 32
    iterations: int | None = None  # resolved: iters_per_shot * shots
    schedule: str = "cosine"  # lora.py: CosineAnnealingLR(total_iters, eta_min=1e-6)
    min_lr: float = 1e-6  # lora.py: eta_min=1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "r", isinstance(self.r, int) and self.r >= 1, "must be an integer >= 1")
        check(self, "alpha", self.alpha > 0, "must be > 0")
        check(self, "dropout", 0 <= self.dropout < 1, "must be in [0, 1)")
        check(self, "scaling", self.scaling in SCALINGS, f"must be one of {', '.join(SCALINGS)}")
        check(self, "targets", len(self.targets) > 0 and set(self.targets) <= set(TARGETS),
              f"must be a non-empty subset of {', '.join(TARGETS)}")
        check(self, "towers", self.towers in TOWERS, f"must be one of {', '.join(TOWERS)}")
        check(self, "iters_per_shot", self.iters_per_shot >= 1, "must be >= 1")

    def resolve(self, ctx: RunContext) -> LoRAConfig:
        if self.iterations is None and self.epochs is None:
            return dataclasses.replace(self, iterations=self.iters_per_shot * ctx.shots)
        return self

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.scaling == "sqrt" else self.r)


class LoRAAttention(nn.Module):
    """open_clip's fused self-attention plus low-rank deltas on q, k and v.

    Called like the nn.MultiheadAttention it replaces (`attn(x, x, x, need_weights=False,
    attn_mask=...)`, batch first) and returns `(output, None)`. The wrapped attention stays frozen
    and in eval mode; only `lora_A[t]` (r, D) and `lora_B[t]` (D, r) train.
    """

    def __init__(self, attn: nn.MultiheadAttention, r: int, scale: float, dropout: float,
                 targets: Sequence[str]):
        super().__init__()
        self.attn = attn
        d = attn.embed_dim
        self.scale = scale
        self.targets = tuple(targets)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for t in self.targets:
            a = torch.empty(r, d, device=attn.in_proj_weight.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # loralib: as nn.Linear's default init
            self.lora_A[t] = nn.Parameter(a)
            self.lora_B[t] = nn.Parameter(torch.zeros(d, r, device=a.device))  # B = 0: identity at init
        # One dropout per projection, as loralib's LinearLoRA layers each have their own.
        self.dropout = nn.ModuleDict({t: nn.Dropout(dropout) for t in self.targets})

    def delta(self, t: str, x: torch.Tensor) -> torch.Tensor:
        """scale * dropout(x) A^T B^T. (B, N, D) -> (B, N, D)"""
        return self.scale * F.linear(F.linear(self.dropout[t](x), self.lora_A[t]), self.lora_B[t])

    def delta_weight(self, t: str) -> torch.Tensor:
        """The update of projection t's weight: scale * B A. (D, D)"""
        return self.scale * (self.lora_B[t] @ self.lora_A[t])

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None, **_: Any):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("LoRAAttention supports self-attention only (query is key is value)")
        deltas = {f"{t}_delta": self.delta(t, query) for t in self.targets}
        return attn_forward(self.attn, query, attn_mask, **deltas), None  # (B, N, D)

    def train(self, mode: bool = True) -> LoRAAttention:
        super().train(mode)
        self.attn.train(False)  # CLIP's own module stays in eval mode
        return self


@register_method("lora")
class LoRA(Method):
    """CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024): low-rank updates of q, k, v in every attention
    block of both towers. Trainable: the LoRA A/B matrices (184,320 on ViT-B/16 at r = 2).
    Mergeable into a plain CLIP; exactly zero-shot CLIP at initialisation (B = 0)."""

    Config = LoRAConfig
    tasks = ("classification", "ucdr")
    mergeable = True
    identity_at_init = True
    template_policy = "'a photo of a {}.' for every dataset (CLIP-LoRA), overridable with `template`"

    def __init__(self, backbone: Backbone, classnames: Sequence[str], config: LoRAConfig | None = None,
                 template: str = "a photo of a {}."):
        super().__init__(backbone, classnames, config, template)
        cfg: LoRAConfig = self.config
        self.template = cfg.template
        names = {id(m): n for n, m in backbone.named_modules()}
        blocks = []
        if cfg.towers in ("both", "image"):
            blocks += list(backbone.image_blocks)
        if cfg.towers in ("both", "text"):
            blocks += list(backbone.text_blocks)
        self._paths: list[str] = []
        for block in blocks:
            attn = block_parts(block)["attn"]
            path = names[id(attn)]
            wrapper = LoRAAttention(attn, cfg.r, cfg.scale, cfg.dropout, cfg.targets)
            replace_submodule(backbone, path, wrapper)
            self._paths.append(path)

    def lora_modules(self) -> list[LoRAAttention]:
        return [self.backbone.get_submodule(p) for p in self._paths]

    def merge(self) -> Backbone:
        """A copy of the backbone with B A * scale folded into the q/k/v slices of in_proj_weight."""
        merged = self.backbone.copy()
        for path in self._paths:
            wrapper: LoRAAttention = merged.get_submodule(path)
            attn = wrapper.attn
            d = attn.embed_dim
            with torch.no_grad():
                for i, t in enumerate(TARGETS):
                    if t in wrapper.targets:
                        attn.in_proj_weight[i * d:(i + 1) * d] += wrapper.delta_weight(t)  # (D, D) slice
            restore_submodule(merged, path, attn)
        freeze(merged)
        return merged

    def describe(self) -> dict[str, Any]:
        cfg: LoRAConfig = self.config
        return {"lora_modules": len(self._paths), "scale": cfg.scale, "targets": list(cfg.targets),
                "towers": cfg.towers}
