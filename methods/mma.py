"""MMA, the Multi-Modal Adapter (Yang et al., "MMA: Multi-Modal Adapter for Vision-Language
Models", CVPR 2024; official code ZjjConan/Multi-Modal-Adapter, trainers/mmadapter.py and the
modified block in clip/model.py, gradient scaling in clip/gsl.py).

In blocks 5..12 of both towers (1-based, 12-block numbering) a parallel branch reads the block's
input x and adds to the block's output:
    y = scale * up_t(shared_j(down_t(ln_1(x))))         scale = 0.001
    block'(x) = block(x) + y
down_t: Linear(d_t, 32) + ReLU and up_t: Linear(32, d_t) are per tower (d_t its width); shared_j:
Linear(32, 32) + ReLU is one layer per block index, used by the image and the text branch of
that block: the coupling of the two towers. ln_1 is the block's own (frozen) LayerNorm.
As in the official code, the branch is wrapped in a gradient-scaling function (identity forward):
the gradient into x through the branch is multiplied by `scale`, the gradient leaving y by
1/scale, so the adapter's parameters are trained as if the 0.001 were not there.
Init: Kaiming-normal (fan_out, ReLU), bias 0 -> MMA is *not* the identity at initialisation.

Trainable (ViT-B/16, blocks 5..12, dim 32): 8 * (24,608 + 25,344 + 16,416 + 16,896 + 1,056)
= 674,560 (down and up of each tower with biases, plus the shared layer).

Shallower or unequal towers: the 12-block range [5, 12] maps onto each tower separately with
`map_range` (a tiny 2-block tower adapts blocks [1, 2]); widths are per tower, the shared layer
always has the bottleneck width. Shared layers are indexed by text block: image block i uses
the shared layer of text block ceil(i * L_txt / L_img) (the inverse of DESIGN.md's coupling),
so equal towers share layer i between image block i and text block i, as the official code does.

Template policy: the fixed prompt "a photo of a {}." (TEXT_CTX_INIT "a photo of a" + name + ".").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftbench.backbone import Backbone, block_parts, replace_submodule
from peftbench.config import MethodConfig, RunContext, check
from peftbench.method import REFERENCE_DEPTH, Method, check_range, map_range
from peftbench.registry import register_method


@dataclass(frozen=True)
class MMAConfig(MethodConfig):
    """MMA defaults (ZjjConan/Multi-Modal-Adapter configs/trainers/MultiModalAdapter/vit_b16_ep5.yaml)."""

    layers: tuple[int, int] = (5, 12)  # ADAPTER_START 5, ADAPTER_END 12 (12-block numbering, mapped)
    image_layers: tuple[int, int] | None = None  # explicit image-tower blocks (literal); None: mapped
    text_layers: tuple[int, int] | None = None  # explicit text-tower blocks (literal); None: mapped
    dim: int = 32  # ADAPTER_DIM 32
    scale: float = 0.001  # ADAPTER_SCALE 0.001
    template: str = "a photo of a {}."  # TEXT_CTX_INIT "a photo of a" + " " + name + "."
    optimizer: str = "sgd"  # OPTIM.NAME sgd
    lr: float = 0.0015  # OPTIM.LR 0.0015
    momentum: float = 0.9  # Dassl default OPTIM.MOMENTUM
    weight_decay: float = 5e-4  # Dassl default OPTIM.WEIGHT_DECAY
    batch_size: int = 16  # DATALOADER.TRAIN_X.BATCH_SIZE 16
    epochs: int | None = 5  # OPTIM.MAX_EPOCH 5
    schedule: str = "cosine"  # OPTIM.LR_SCHEDULER cosine, WARMUP_EPOCH 0

    def __post_init__(self) -> None:
        super().__post_init__()
        a, b = self.layers
        check(self, "layers", 1 <= a <= b <= REFERENCE_DEPTH,
              f"must satisfy 1 <= start <= end <= {REFERENCE_DEPTH} (12-block numbering)")
        for name in ("image_layers", "text_layers"):
            rng = getattr(self, name)
            check(self, name, rng is None or (len(rng) == 2 and 1 <= rng[0] <= rng[1]),
                  "must be null or [start, end] with 1 <= start <= end")
        check(self, "dim", isinstance(self.dim, int) and self.dim >= 1, "must be an integer >= 1")
        check(self, "scale", self.scale > 0, "must be > 0")

    def tower_ranges(self, n_image: int, n_text: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """1-based inclusive block ranges (image, text): explicit ones validated, others mapped."""
        out = []
        for name, n in (("image_layers", n_image), ("text_layers", n_text)):
            rng = getattr(self, name)
            if rng is None:
                rng = map_range(*self.layers, n)
            else:
                check_range(name, rng[0], rng[1], n)
            out.append((int(rng[0]), int(rng[1])))
        return out[0], out[1]

    def resolve(self, ctx: RunContext) -> MMAConfig:
        image, text = self.tower_ranges(ctx.n_image_blocks, ctx.n_text_blocks)
        return dataclasses.replace(self, image_layers=image, text_layers=text)


class _GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradScale.apply(x, scale)


class TowerAdapter(nn.Module):
    """One tower's branch weights at one block: down(d -> dim) + ReLU, up(dim -> d)."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.up = nn.Linear(dim, width)


def _init(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) weights, zero biases (trainers/mmadapter.py _build_adapter)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


class MMABlock(nn.Module):
    """A frozen CLIP block with MMA's parallel branch added to its output.

    The branch modules are owned by the MMA method (registered there, not here), so the same
    shared layer serves an image block and a text block without being registered twice.
    """

    def __init__(self, block: nn.Module, adapter: TowerAdapter, shared: nn.Module, scale: float):
        super().__init__()
        self.block = block
        self.ln_1 = block_parts(block)["ln_1"]
        self.__dict__["_adapter"] = adapter  # not registered: see the class docstring
        self.__dict__["_shared"] = shared
        self.scale = scale

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """scale * up(shared(down(ln_1(x)))) with MMA's gradient scaling. (B, N, D) -> (B, N, D)"""
        y = grad_scale(x, self.scale)
        y = torch.relu(self._adapter.down(self.ln_1(y)))  # (B, N, dim)
        y = torch.relu(self._shared(y))  # (B, N, dim)
        y = self._adapter.up(y) * self.scale  # (B, N, D)
        return grad_scale(y, 1.0 / self.scale)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.block(x, attn_mask=attn_mask, **kwargs) + self.branch(x)

    def train(self, mode: bool = True) -> MMABlock:
        super().train(mode)
        self.block.train(False)  # CLIP's own block stays in eval mode
        return self


@register_method("mma")
class MMA(Method):
    """MMA (Yang et al., CVPR 2024): per-tower bottleneck branches coupled by a shared layer in the
    upper blocks (5..12) of both towers. Trainable: the branch layers (674,560 on ViT-B/16).
    Not identity at init (Kaiming-normal branch scaled by 0.001); not mergeable (non-linear)."""

    Config = MMAConfig
    tasks = ("classification", "ucdr")
    mergeable = False
    identity_at_init = False
    template_policy = "the fixed prompt 'a photo of a {}.' (MMA's TEXT_CTX_INIT), overridable with `template`"

    def __init__(self, backbone: Backbone, classnames: Sequence[str], config: MMAConfig | None = None,
                 template: str = "a photo of a {}."):
        super().__init__(backbone, classnames, config, template)
        cfg: MMAConfig = self.config
        self.template = cfg.template
        n_img, n_txt = len(backbone.image_blocks), len(backbone.text_blocks)
        self.image_range, self.text_range = cfg.tower_ranges(n_img, n_txt)
        text_ids = list(range(self.text_range[0], self.text_range[1] + 1))
        image_ids = list(range(self.image_range[0], self.image_range[1] + 1))
        self.image_to_text = {i: self.coupled_text_block(i, n_img, n_txt) for i in image_ids}
        shared_ids = sorted(set(text_ids) | set(self.image_to_text.values()))
        # Keys are 1-based block numbers, as the official code's layer_index.
        dv, dt = backbone.vision_width, backbone.text_width
        self.visual_adapter = nn.ModuleDict({str(i): TowerAdapter(dv, cfg.dim) for i in image_ids})
        self.text_adapter = nn.ModuleDict({str(j): TowerAdapter(dt, cfg.dim) for j in text_ids})
        self.shared_adapter = nn.ModuleDict({str(j): nn.Linear(cfg.dim, cfg.dim) for j in shared_ids})
        for m in (self.visual_adapter, self.text_adapter, self.shared_adapter):
            _init(m)
        self.to(backbone.device)
        names = {id(m): n for n, m in backbone.named_modules()}
        for i in image_ids:
            block = backbone.image_blocks[i - 1]
            shared = self.shared_adapter[str(self.image_to_text[i])]
            wrapped = MMABlock(block, self.visual_adapter[str(i)], shared, cfg.scale)
            replace_submodule(backbone, names[id(block)], wrapped)
        for j in text_ids:
            block = backbone.text_blocks[j - 1]
            wrapped = MMABlock(block, self.text_adapter[str(j)], self.shared_adapter[str(j)], cfg.scale)
            replace_submodule(backbone, names[id(block)], wrapped)

    @staticmethod
    def coupled_text_block(i: int, n_image: int, n_text: int) -> int:
        """Image block i (1-based) -> text block ceil(i * L_txt / L_img) whose shared layer it uses."""
        return max(1, math.ceil(i * n_text / n_image))

    def describe(self) -> dict[str, Any]:
        return {
            "image_layers": list(self.image_range),
            "text_layers": list(self.text_range),
            "image_to_text_shared": {str(i): j for i, j in self.image_to_text.items()},
            "dim": self.config.dim,
            "scale": self.config.scale,
        }
