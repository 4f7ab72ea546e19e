"""CoCoOp: CoOp's context shifted per image by a small meta-network.

Zhou, Yang, Loy, Liu, "Conditional Prompt Learning for Vision-Language Models", CVPR 2022.
Official code read for this port: KaiyangZhou/CoOp, `trainers/cocoop.py` and
`configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml`.

Trainable: the context vectors (M x w_t) and the meta-net
Linear(E, E // 16) -> ReLU -> Linear(E // 16, w_t), where E is the joint embedding width: the
official meta-net reads `clip_model.visual.output_dim` (the *projected*, L2-normalised image
feature), so its input and hidden widths follow E, its output the text width w_t. On ViT-B/16
(E = w_t = 512): 4 x 512 + (512 x 32 + 32) + (32 x 512 + 512) = 35,360.
CLIP stays frozen.

Text-template policy: the dataset's hand-written template is not used; each prompt is
"<ctx_init phrase> <class>." with the phrase's M token positions replaced by the learned context
plus the image's meta-net bias (one text forward per image).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftbench.backbone import Backbone
from peftbench.config import MethodConfig, check
from peftbench.errors import ConfigError
from peftbench.method import Method, l2norm
from peftbench.methods.coop import ContextPrompts, init_context
from peftbench.registry import register_method


@dataclass(frozen=True)
class CoCoOpConfig(MethodConfig):
    """CoCoOp defaults: configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml (KaiyangZhou/CoOp)."""

    n_ctx: int = 4  # TRAINER.COCOOP.N_CTX; ignored when ctx_init is set (its token count is used)
    ctx_init: str = "a photo of a"  # TRAINER.COCOOP.CTX_INIT; "" = random N(0, init_std)
    init_std: float = 0.02  # nn.init.normal_(ctx_vectors, std=0.02) (random init only)
    meta_reduction: int = 16  # meta-net hidden width = vis_dim // 16 (trainers/cocoop.py)
    optimizer: str = "sgd"  # OPTIM.NAME
    lr: float = 0.002  # OPTIM.LR
    weight_decay: float = 5e-4  # Dassl default OPTIM.WEIGHT_DECAY
    momentum: float = 0.9  # Dassl default OPTIM.MOMENTUM
    batch_size: int = 1  # DATALOADER.TRAIN_X.BATCH_SIZE
    epochs: int | None = 10  # OPTIM.MAX_EPOCH
    schedule: str = "cosine"  # OPTIM.LR_SCHEDULER
    warmup_epochs: float = 1.0  # OPTIM.WARMUP_EPOCH
    warmup_type: str = "constant"  # OPTIM.WARMUP_TYPE
    warmup_lr: float = 1e-5  # OPTIM.WARMUP_CONS_LR

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "n_ctx", isinstance(self.n_ctx, int) and self.n_ctx >= 1, "must be an integer >= 1")
        check(self, "init_std", self.init_std > 0, "must be > 0")
        check(self, "meta_reduction", self.meta_reduction >= 1, "must be >= 1")


@register_method("cocoop")
class CoCoOp(Method):
    """CoCoOp (Zhou et al., CVPR 2022): context vectors + meta-net bias from each image's feature.

    Trainable: `prompt.ctx` (M, w_t) and `meta_net` (E -> E//16 -> w_t); 35,360 on ViT-B/16.
    `class_scores(image_features, images)` builds one set of class prompts per image (the
    official CustomCLIP.forward loop). `class_text_features()` (no image) returns the features of
    the un-shifted context (meta-net bias omitted): CoCoOp has no image-free text features, so
    this is only an approximation for callers that need one; scoring never uses it.
    """

    Config = CoCoOpConfig
    tasks = ("classification", "ucdr")
    mergeable = False
    identity_at_init = False
    template_policy = "learned context shifted per image: '<ctx_init with learned vectors> <class>.'"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        config: CoCoOpConfig | None = None,
        template: str = "a photo of a {}.",
    ):
        super().__init__(backbone, classnames, config, template)
        cfg = self.config
        n_ctx, prefix_text, vectors = init_context(backbone, cfg.ctx_init, cfg.n_ctx, cfg.init_std)
        vis_dim = backbone.embed_dim  # official: clip_model.visual.output_dim
        hidden = vis_dim // cfg.meta_reduction
        if hidden < 1:
            raise ConfigError(
                "meta_reduction",
                f"embed_dim {vis_dim} // {cfg.meta_reduction} leaves no hidden unit; use <= {vis_dim}",
            )
        self.prompt = ContextPrompts(backbone, self.classnames, n_ctx, prefix_text, vectors, "end")
        self.meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(vis_dim, hidden)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(hidden, backbone.text_width)),
                ]
            )
        ).to(backbone.device)

    def prompts(self) -> list[str]:
        return [f"{self.prompt.prefix_text} {c}." for c in self.classnames]

    def _text_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """(C, E) class text features for one context (M, w_t)."""
        x = self.prompt.embed(self.backbone, ctx)  # (C, L, w_t)
        return self.backbone.text_forward(x, self.prompt.eot_index(self.backbone))  # (C, E)

    def class_text_features(self) -> torch.Tensor:
        """(C, E) features of the un-shifted context (no image, so no meta-net bias)."""
        if self.training:
            return self._text_features(self.prompt.ctx)
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = self._text_features(self.prompt.ctx)
        return self._text_cache

    def class_scores(self, image_features: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine (B, C): each image gets its own prompts, ctx + meta_net(normalised feature)."""
        feats = l2norm(image_features)  # (B, E)
        bias = self.meta_net(feats.to(self.prompt.ctx.dtype))  # (B, w_t)
        ctx = self.prompt.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (B, M, w_t)
        rows = []
        for feat_i, ctx_i in zip(feats, ctx, strict=True):
            text = l2norm(self._text_features(ctx_i))  # (C, E)
            rows.append(feat_i @ text.t())  # (C,)
        return torch.stack(rows)  # (B, C)

    def describe(self) -> dict[str, Any]:
        lin1 = self.meta_net.linear1
        return {
            "n_ctx": self.prompt.n_ctx,
            "ctx_init": self.prompt.prefix_text if self.config.ctx_init else None,
            "meta_net": f"Linear({lin1.in_features}, {lin1.out_features}) -> ReLU -> "
            f"Linear({lin1.out_features}, {self.meta_net.linear2.out_features})",
            "meta_net_input": "L2-normalised joint-space image feature (embed_dim), as the official code",
        }
