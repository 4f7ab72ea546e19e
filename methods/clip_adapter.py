"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters",
IJCV 2023; official code gaopengcuhk/CLIP-Adapter, clip_adapter.py).

A bottleneck MLP on the image feature (after CLIP's image projection):
    a(f) = ReLU(W_up ReLU(W_down f)),  W_down (d/4, d), W_up (d, d/4), no biases,
    f'   = ratio * a(f) + (1 - ratio) * f,  ratio = 0.2.
d is the joint embedding width (`embed_dim`): 512 on ViT-B/16, giving 2 * 512 * 128 = 131,072
trainable parameters. The released file hard-codes `Adapter(1024, 4)`, the width of RN50's
embedding; a ViT port must use the backbone's own width, as here.

Trainable: the two adapter matrices only. Text side: frozen CLIP with the dataset's hand-written
template (the official code's CUSTOM_TEMPLATES are per dataset), computed once.
Not identity at initialisation (the adapter's random init moves the feature), not mergeable (a
non-linear head). The training recipe was never released: CoOp's optimiser defaults are used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftbench.backbone import Backbone
from peftbench.config import MethodConfig, RunContext, check
from peftbench.errors import ConfigError
from peftbench.method import Method
from peftbench.registry import register_method


def coop_epochs(shots: int, dataset: str) -> int:
    """CoOp's epochs by shots (KaiyangZhou/CoOp configs/trainers/CoOp/*): ImageNet 50 at every
    shot count; else 50 (1 shot), 100 (2, 4 shots), 200 (8, 16 shots)."""
    if dataset.lower() == "imagenet" or shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


@dataclass(frozen=True)
class CLIPAdapterConfig(MethodConfig):
    """CLIP-Adapter's structure (clip_adapter.py) with CoOp's optimiser defaults: the CLIP-Adapter
    repository never released a training recipe, so CoOp's (configs/trainers/CoOp/vit_b16*.yaml)
    is used, as the method card says."""

    reduction: int = 4  # clip_adapter.py: Adapter(c_in, reduction=4)
    ratio: float = 0.2  # clip_adapter.py: ratio = 0.2 (residual blend)
    optimizer: str = "sgd"  # CoOp: OPTIM.NAME sgd (recipe not released by CLIP-Adapter)
    lr: float = 2e-3  # CoOp: OPTIM.LR 0.002
    momentum: float = 0.9  # CoOp / Dassl default
    weight_decay: float = 5e-4  # CoOp / Dassl default
    batch_size: int = 32  # CoOp: DATALOADER.TRAIN_X.BATCH_SIZE 32
    epochs: int | None = None  # resolved with CoOp's rule (coop_epochs)
    schedule: str = "cosine"  # CoOp: LR_SCHEDULER cosine
    warmup_epochs: float = 1.0  # CoOp: WARMUP_EPOCH 1
    warmup_type: str = "constant"  # CoOp: WARMUP_TYPE constant
    warmup_lr: float = 1e-5  # CoOp: WARMUP_CONS_LR 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "reduction", isinstance(self.reduction, int) and self.reduction >= 1,
              "must be an integer >= 1")
        check(self, "ratio", 0 <= self.ratio <= 1, "must be in [0, 1]")

    def resolve(self, ctx: RunContext) -> CLIPAdapterConfig:
        if self.epochs is None and self.iterations is None:
            return dataclasses.replace(self, epochs=coop_epochs(ctx.shots, ctx.dataset))
        return self


class Adapter(nn.Module):
    """Linear(d, d/r, no bias) -> ReLU -> Linear(d/r, d, no bias) -> ReLU. (B, d) -> (B, d)"""

    def __init__(self, d: int, reduction: int):
        super().__init__()
        if d // reduction < 1:
            raise ConfigError("reduction", f"must be <= the embedding width {d} (got {reduction})")
        self.down = nn.Linear(d, d // reduction, bias=False)
        self.up = nn.Linear(d // reduction, d, bias=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.up(torch.relu(self.down(f))))


@register_method("clip_adapter")
class CLIPAdapter(Method):
    """CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on the image embedding.
    Trainable: the adapter's two bias-free matrices (131,072 on ViT-B/16)."""

    Config = CLIPAdapterConfig
    tasks = ("classification", "ucdr")
    mergeable = False
    identity_at_init = False
    template_policy = "the dataset's hand-written template, frozen (CLIP-Adapter's CUSTOM_TEMPLATES)"

    def __init__(self, backbone: Backbone, classnames: Sequence[str], config: CLIPAdapterConfig | None = None,
                 template: str = "a photo of a {}."):
        super().__init__(backbone, classnames, config, template)
        cfg: CLIPAdapterConfig = self.config
        self.adapter = Adapter(backbone.embed_dim, cfg.reduction).to(backbone.device)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        f = self.backbone.encode_image(images)  # (B, E), frozen
        ratio = self.config.ratio
        return ratio * self.adapter(f) + (1 - ratio) * f  # (B, E)

    def class_text_features(self) -> torch.Tensor:
        """The text side is frozen: computed once, without gradients, in train and eval mode."""
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = self.encode_text(self.prompts()).detach()  # (C, E)
        return self._text_cache

    def train(self, mode: bool = True) -> CLIPAdapter:
        cache = self._text_cache
        super().train(mode)
        self._text_cache = cache  # frozen text features do not change with the mode
        return self

    def describe(self) -> dict[str, Any]:
        d = self.backbone.embed_dim
        return {"adapter_width": d, "bottleneck": d // self.config.reduction, "ratio": self.config.ratio}
