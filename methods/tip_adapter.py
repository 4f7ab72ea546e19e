"""Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot
Classification", ECCV 2022; official code gaopengcuhk/Tip-Adapter, main.py and utils.py).

A key-value cache built from the few-shot training set (`prepare`):
    keys   = L2-normalised mean over `augment_views` augmented views of each training image's
             CLIP image feature, (N*K, D); values = one-hot labels, (N*K, N)
    logits = 100 * f W^T + alpha * exp(-beta * (1 - f keys^T)) values
with f the L2-normalised image feature and W the L2-normalised zero-shot class embeddings
(the dataset's template). "-F" trains the keys: a bias-free Linear(D, N*K) initialised from them.
alpha and beta are searched on the *validation* split (`train_data.val`) on the official grid,
never on test (the released code's last step reads test accuracies; here only val is used):
once in `prepare` with the initial keys, and again when training ends (the switch back to eval
mode after training) with the trained keys. Training itself uses `init_alpha` / `init_beta`, as
the official code does. The cache values and the searched alpha and beta are buffers of the
method, saved with its trainable state.

Trainable: the keys only, D x N*K (ViT-B/16, ImageNet 16-shot: 512 x 16,000 = 8,192,000). The
size depends on the number of classes and the shots: the config's `shots` field is filled from
the run's shots by `Config.resolve`. Classification only: the cache is a classifier.

Template policy: the dataset's hand-written template (the official code uses each dataset's
template, and a 7-template ensemble on ImageNet, not reproduced here).
Logit scale: the official 100, not the backbone's learned scale.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from peftbench.backbone import Backbone
from peftbench.config import MethodConfig, RunContext, check
from peftbench.errors import ConfigError
from peftbench.method import Method, l2norm
from peftbench.registry import register_method

log = logging.getLogger(__name__)

CLIP_SCALE = 100.0  # main.py: clip_logits = 100. * features @ clip_weights


@dataclass(frozen=True)
class TipAdapterConfig(MethodConfig):
    """Tip-Adapter-F defaults (gaopengcuhk/Tip-Adapter: main.py, utils.py, configs/imagenet.yaml)."""

    shots: int | None = None  # resolved from the run's shots: sizes the cache (N * shots keys)
    augment_views: int = 10  # configs/*.yaml augment_epoch 10
    init_alpha: float = 1.17  # configs/imagenet.yaml init_alpha (other datasets' yaml files differ)
    init_beta: float = 1.0  # configs/imagenet.yaml init_beta
    search: bool = True  # configs/*.yaml search_hp True
    search_scale: tuple[float, float] = (7.0, 3.0)  # configs/imagenet.yaml search_scale [beta, alpha]
    search_steps: tuple[int, int] = (200, 20)  # configs/*.yaml search_step [beta, alpha]
    optimizer: str = "adamw"  # main.py: torch.optim.AdamW
    lr: float = 1e-3  # configs/*.yaml lr 0.001
    eps: float = 1e-4  # main.py: AdamW(eps=1e-4)
    weight_decay: float = 1e-2  # main.py passes none: torch AdamW's default 0.01
    betas: tuple[float, float] = (0.9, 0.999)  # torch AdamW default
    batch_size: int = 256  # main.py: train_loader_F batch_size 256
    epochs: int | None = 20  # configs/*.yaml train_epoch 20
    schedule: str = "cosine"  # main.py: CosineAnnealingLR(T_max = epochs * len(loader)), eta_min 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "shots", self.shots is None or (isinstance(self.shots, int) and self.shots >= 1),
              "must be an integer >= 1 (or null: the run's shots)")
        check(self, "augment_views", self.augment_views >= 1, "must be >= 1")
        check(self, "init_alpha", self.init_alpha >= 0, "must be >= 0")
        check(self, "init_beta", self.init_beta >= 0, "must be >= 0")
        check(self, "search_scale", len(self.search_scale) == 2 and min(self.search_scale) > 0.1,
              "must be [beta_max, alpha_max], both > 0.1")
        check(self, "search_steps", len(self.search_steps) == 2 and min(self.search_steps) >= 1,
              "must be [beta_steps, alpha_steps], both >= 1")

    def resolve(self, ctx: RunContext) -> TipAdapterConfig:
        if self.shots is None:
            return dataclasses.replace(self, shots=ctx.shots)
        return self


def search_grid(scale: float, steps: int) -> list[float]:
    """The official grid (utils.py search_hp): 0.1 + i * (scale - 0.1) / steps, i < steps."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


@register_method("tip_adapter")
class TipAdapter(Method):
    """Tip-Adapter-F (Zhang et al., ECCV 2022): a few-shot feature cache whose keys are trained.
    Trainable: the cache keys, D x N*K. Classification only; alpha/beta searched on val."""

    Config = TipAdapterConfig
    tasks = ("classification",)
    mergeable = False
    identity_at_init = False
    template_policy = "the dataset's hand-written template (zero-shot classifier), frozen"

    def __init__(self, backbone: Backbone, classnames: Sequence[str], config: TipAdapterConfig | None = None,
                 template: str = "a photo of a {}."):
        super().__init__(backbone, classnames, config, template)
        cfg: TipAdapterConfig = self.config
        if cfg.shots is None:
            raise ConfigError("shots", "Tip-Adapter sizes its cache by classes x shots: resolve the config "
                                       "with the run's context or set shots=K")
        n, d = len(self.classnames), backbone.embed_dim
        nk = n * cfg.shots
        self.keys = nn.Linear(d, nk, bias=False).to(backbone.device)  # weight (N*K, D): the cache keys
        nn.init.zeros_(self.keys.weight)  # filled by prepare()
        self.register_buffer("cache_values", torch.zeros(nk, n, device=backbone.device))  # (N*K, N) one-hot
        self.register_buffer("alpha", torch.tensor(cfg.init_alpha, device=backbone.device))  # used in eval
        self.register_buffer("beta", torch.tensor(cfg.init_beta, device=backbone.device))
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None  # (features, labels), not saved
        self.search_log: dict[str, Any] = {}

    # ------------------------------------------------------------------ cache
    @torch.no_grad()
    def image_features(self, dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised CLIP image features (M, D) and labels (M,) of a dataset, in order."""
        feats, labels = [], []
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            feats.append(self.backbone.encode_image(batch[0].to(self.backbone.device)))
            labels.append(torch.as_tensor(batch[1]))
        return torch.cat(feats), torch.cat(labels).to(self.backbone.device)

    @torch.no_grad()
    def prepare(self, train_data: Any) -> None:
        """Build the cache from `train_data.train` (augmented views) and search alpha/beta on val."""
        cfg: TipAdapterConfig = self.config
        was_training = self.training
        self.eval()
        views = []
        labels = None
        for _ in range(cfg.augment_views):  # utils.py build_cache_model: augment_epoch passes
            f, y = self.image_features(train_data.train)  # (M, D), fresh random augmentation each pass
            views.append(f)
            labels = y if labels is None else labels
        keys = l2norm(torch.stack(views).mean(dim=0))  # (M, D): mean of views, then normalised
        m, n = keys.shape[0], len(self.classnames)
        if m != self.keys.out_features:
            log.warning("tip_adapter: %d training images instead of %d classes x %d shots; cache resized",
                        m, n, cfg.shots)
            self.keys = nn.Linear(keys.shape[1], m, bias=False).to(keys.device)
            self.cache_values = torch.zeros(m, n, device=keys.device)
        self.keys.weight.copy_(keys)
        self.cache_values.copy_(F.one_hot(labels.long(), n).float())
        val = getattr(train_data, "val", None)
        if val is not None and len(val) > 0:
            vf, vy = self.image_features(val)
            self._val = (l2norm(vf), vy)
        self.search_hp()  # Tip-Adapter (training-free) values, used if no training follows
        self.train(was_training)

    # ------------------------------------------------------------------ logits
    def cache_logits(self, f: torch.Tensor, alpha: float | torch.Tensor,
                     beta: float | torch.Tensor) -> torch.Tensor:
        """alpha * exp(-beta (1 - f keys^T)) values. f (B, D) normalised -> (B, N)"""
        affinity = self.keys(f)  # (B, N*K)
        return alpha * torch.exp(-beta * (1 - affinity)) @ self.cache_values

    def class_text_features(self) -> torch.Tensor:
        """The zero-shot classifier is frozen: computed once, without gradients."""
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = self.encode_text(self.prompts()).detach()  # (C, E)
        return self._text_cache

    def class_scores(self, image_features: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Tip logits / 100: cosine to the classes plus the cache term / 100. (B, C)"""
        f = l2norm(image_features)  # (B, D)
        clip = f @ l2norm(self.class_text_features()).t()  # (B, C)
        if self.training:
            alpha, beta = self.config.init_alpha, self.config.init_beta  # main.py: training uses init values
        else:
            alpha, beta = self.alpha, self.beta
        return clip + self.cache_logits(f, alpha, beta) / CLIP_SCALE

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """100 * f W^T + alpha * cache term (the official fixed scale of 100). (B, C)"""
        with torch.no_grad():
            f = self.encode_image(images)  # (B, D): the image tower is frozen
        return CLIP_SCALE * self.class_scores(f, images)

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def search_hp(self) -> None:
        """Grid-search (beta, alpha) on the validation features (utils.py search_hp order: beta
        outer, alpha inner, the first best kept). No validation split: the init values stay."""
        cfg: TipAdapterConfig = self.config
        if not cfg.search or self._val is None:
            self.alpha.fill_(cfg.init_alpha)
            self.beta.fill_(cfg.init_beta)
            self.search_log = {"searched": False, "alpha": cfg.init_alpha, "beta": cfg.init_beta}
            return
        f, y = self._val
        clip = CLIP_SCALE * f @ l2norm(self.class_text_features()).t()  # (V, C)
        affinity = self.keys(f)  # (V, N*K)
        alphas = torch.tensor(search_grid(cfg.search_scale[1], cfg.search_steps[1]), device=f.device)
        best = (-1.0, cfg.init_beta, cfg.init_alpha)
        for beta in search_grid(cfg.search_scale[0], cfg.search_steps[0]):
            cache = torch.exp(-beta * (1 - affinity)) @ self.cache_values  # (V, C)
            logits = clip[None] + alphas[:, None, None] * cache[None]  # (A, V, C)
            acc = (logits.argmax(-1) == y[None]).float().mean(-1) * 100  # (A,)
            i = int(acc.argmax())  # first maximum: the official strict '>' keeps the earliest
            if float(acc[i]) > best[0]:
                best = (float(acc[i]), beta, float(alphas[i]))
        self.beta.fill_(best[1])
        self.alpha.fill_(best[2])
        self.search_log = {"searched": True, "val_acc": best[0], "alpha": best[2], "beta": best[1],
                           "n_val": int(y.numel())}

    def after_fit(self, train_data: Any) -> None:
        """Training ended: search alpha/beta again with the trained keys (main.py, after -F)."""
        self.search_hp()

    def train(self, mode: bool = True) -> TipAdapter:
        cache = self._text_cache
        super().train(mode)
        self._text_cache = cache  # frozen text features do not change with the mode
        return self

    def describe(self) -> dict[str, Any]:
        return {"cache_size": self.keys.out_features, "shots": self.config.shots, "clip_scale": CLIP_SCALE,
                "search": dict(self.search_log)}
