"""MaPLe: multi-modal prompt learning, text prompts coupled to visual prompts at every prompted depth.

Khattak, Rasheed, Maaz, Khan, Khan, "MaPLe: Multi-modal Prompt Learning", CVPR 2023.
Official code read for this port: muzairkhattak/multimodal-prompt-learning, `trainers/maple.py`
(MultiModalPromptLearner), `clip/model.py` (ResidualAttentionBlock_MaPLe, VisionTransformer_MaPLe)
and `configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`.

Structure (depth d, n context tokens; 1-based layers):
- text: the prompt is "a photo of a <class>." and the n tokens after start-of-text ("a photo")
  are replaced by learned vectors `ctx` (initialised from those words); before text layers 2..d the
  same positions are replaced by deeper prompts `deep_text[j]` (N(0, 0.02)).
- vision: `proj(ctx)` (Linear w_t -> w_v) is appended after [CLS + patches] *before* ln_pre (as in
  VisionTransformer_MaPLe.forward; ln_pre acts per token); before image layers 2..d the last n
  tokens are replaced by `deep_proj[j](deep_text[j])`, one Linear per depth. The deeper
  projections start as copies of one Linear (the official `_get_clones`). Pooling takes the class
  token, so the appended tokens only act through attention.

Trainable: ctx (n x w_t) + (d - 1) deeper prompts (n x w_t) + d Linear(w_t -> w_v).
ViT-B/16, d=9, n=2: 1,024 + 8,192 + 9 x (512 x 768 + 768) = 3,555,072. CLIP stays frozen.

Text-template policy: the dataset's hand-written template is not used; the prompt is
"<ctx_init> <class>." with its first n tokens learned ("a photo of a" by default).

Depth: the default prompt depth 9 is for 12-block towers and is mapped with `map_depth`
(DESIGN.md) on the text tower; text layer j couples with image layer
`coupled_image_block(j, L_img, L_txt)` (identity when both towers have the same depth). An
explicit `prompt_depth` is taken literally and must be <= the text tower's depth.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftbench.backbone import Backbone
from peftbench.config import MethodConfig, RunContext, check
from peftbench.errors import ConfigError, UsageError
from peftbench.method import Method, classname_text, coupled_image_block, map_depth
from peftbench.methods.coop import ContextPrompts, insert_context, n_tokens, phrase_vectors, prompt_tokens
from peftbench.registry import register_method

REFERENCE_PROMPT_DEPTH = 9  # TRAINER.MAPLE.PROMPT_DEPTH on 12-block towers


def resolve_prompt_depth(depth: int | None, n_text_blocks: int) -> int:
    """The prompt depth used on a text tower of `n_text_blocks` blocks (validated)."""
    if depth is None:
        return map_depth(REFERENCE_PROMPT_DEPTH, n_text_blocks)
    if not 1 <= depth <= n_text_blocks:
        raise ConfigError(
            "prompt_depth",
            f"must be in [1, {n_text_blocks}] (the text tower has {n_text_blocks} blocks), got {depth}",
        )
    return depth


@dataclass(frozen=True)
class MaPLeConfig(MethodConfig):
    """MaPLe defaults: configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml (base-to-novel).

    The repository has no few-shot config; the closest official few-shot recipe is PromptSRC's
    (SGD lr 0.0025, batch 4, 50 epochs). Default here: MaPLe's own base-to-novel values.
    """

    n_ctx: int = 2  # TRAINER.MAPLE.N_CTX
    ctx_init: str = "a photo of a"  # TRAINER.MAPLE.CTX_INIT; "" = random N(0, init_std) with "X" tokens
    prompt_depth: int | None = None  # TRAINER.MAPLE.PROMPT_DEPTH = 9 on 12 blocks; None = map_depth(9, L)
    init_std: float = 0.02  # nn.init.normal_(compound_prompts_text, std=0.02)
    optimizer: str = "sgd"  # OPTIM.NAME
    lr: float = 0.0035  # OPTIM.LR
    weight_decay: float = 5e-4  # Dassl default OPTIM.WEIGHT_DECAY
    momentum: float = 0.9  # Dassl default OPTIM.MOMENTUM
    batch_size: int = 4  # DATALOADER.TRAIN_X.BATCH_SIZE
    epochs: int | None = 5  # OPTIM.MAX_EPOCH
    schedule: str = "cosine"  # OPTIM.LR_SCHEDULER
    warmup_epochs: float = 1.0  # OPTIM.WARMUP_EPOCH
    warmup_type: str = "constant"  # OPTIM.WARMUP_TYPE
    warmup_lr: float = 1e-5  # OPTIM.WARMUP_CONS_LR

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "n_ctx", isinstance(self.n_ctx, int) and self.n_ctx >= 1, "must be an integer >= 1")
        check(
            self, "prompt_depth", self.prompt_depth is None or self.prompt_depth >= 1, "must be >= 1 or null"
        )
        check(self, "init_std", self.init_std > 0, "must be > 0")

    def resolve(self, ctx: RunContext) -> MaPLeConfig:
        depth = resolve_prompt_depth(self.prompt_depth, ctx.n_text_blocks)
        return dataclasses.replace(self, prompt_depth=depth)


@register_method("maple")
class MaPLe(Method):
    """MaPLe (Khattak et al., CVPR 2023): coupled text and vision prompts to depth d.

    Trainable: `prompt.ctx` (n, w_t), `deep_text` (d-1 x (n, w_t)), `proj` Linear(w_t, w_v) and
    `deep_proj` (d-1 x Linear(w_t, w_v)); 3,555,072 on ViT-B/16 (d=9, n=2).
    """

    Config = MaPLeConfig
    tasks = ("classification", "ucdr")
    mergeable = False
    identity_at_init = False
    template_policy = "'<ctx_init> <class>.', first n_ctx tokens learned; the dataset template is not used"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        config: MaPLeConfig | None = None,
        template: str = "a photo of a {}.",
    ):
        super().__init__(backbone, classnames, config, template)
        cfg = self.config
        n_img, n_txt = backbone.info.n_image_blocks, backbone.info.n_text_blocks
        if n_img < n_txt:
            raise UsageError(
                f"maple couples text layer j with image layer ceil(j * {n_img} / {n_txt}); an image tower "
                f"shallower than the text tower ({n_img} < {n_txt} blocks) would prompt one image layer twice"
            )
        self.depth = resolve_prompt_depth(cfg.prompt_depth, n_txt)
        n_ctx, w_t, w_v, dev = cfg.n_ctx, backbone.text_width, backbone.vision_width, backbone.device
        phrase = classname_text(cfg.ctx_init).strip()
        if phrase and n_ctx <= n_tokens(backbone, phrase):
            # Official: `if ctx_init and n_ctx <= 4` (the 4 tokens of "a photo of a"); the prompt is the
            # whole phrase and its first n_ctx tokens are learned, initialised from their embeddings.
            vectors = phrase_vectors(backbone, phrase, n_ctx)  # (n, w_t)
            prefix_text = phrase
        else:
            vectors = torch.empty(n_ctx, w_t, device=dev)  # (n, w_t)
            nn.init.normal_(vectors, std=cfg.init_std)
            prefix_text = " ".join(["X"] * n_ctx)
        # Creation order follows MultiModalPromptLearner.__init__: proj, ctx, deeper prompts, projections.
        self.proj = nn.Linear(w_t, w_v).to(dev)  # input-level prompts -> vision width
        self.prompt = ContextPrompts(backbone, self.classnames, n_ctx, prefix_text, vectors, "end")
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, w_t, device=dev)) for _ in range(self.depth - 1)]
        )  # (d-1) x (n, w_t)
        for p in self.deep_text:
            nn.init.normal_(p, std=cfg.init_std)
        single = nn.Linear(w_t, w_v).to(dev)
        self.deep_proj = nn.ModuleList([copy.deepcopy(single) for _ in range(self.depth - 1)])
        # 0-based image block index -> index into deep_text / deep_proj (text layer j = k + 2).
        self.image_slot = {coupled_image_block(k + 2, n_img, n_txt) - 1: k for k in range(self.depth - 1)}

    # ------------------------------------------------------------------ text side
    def prompts(self) -> list[str]:
        return [f"{self.prompt.prefix_text} {c}." for c in self.classnames]

    def _text_forward(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Text tower from prompt embeddings (N, L, w_t) with the deeper prompts -> (N, E)."""
        n = self.prompt.n_ctx

        def block_fn(i: int, h: torch.Tensor) -> torch.Tensor:  # before text block i (0-based)
            if 1 <= i < self.depth:
                deep = self.deep_text[i - 1].to(h.dtype).expand(h.shape[0], -1, -1)  # (N, n, w_t)
                h = torch.cat([h[:, :1], deep, h[:, 1 + n :]], dim=1)  # (N, L, w_t)
            return h

        return self.backbone.text_forward(x, eot, block_fn)

    def _learned_class_features(self) -> torch.Tensor:
        x = self.prompt.embed(self.backbone)  # (C, L, w_t)
        return self._text_forward(x, self.prompt.eot_index(self.backbone))  # (C, E)

    def class_text_features(self) -> torch.Tensor:
        """(C, E) text features of the prompted text tower (recomputed in training, cached in eval)."""
        if self.training:
            return self._learned_class_features()
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = self._learned_class_features()
        return self._text_cache

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Class names -> (N, E) through the prompted text tower: '<ctx_init> <name>.'."""
        names = [classname_text(t) for t in texts]
        p = self.prompt
        tokens, name_lens = prompt_tokens(self.backbone, p.prefix_text, names, p.n_ctx)  # (N, L)
        x = insert_context(self.backbone, tokens, name_lens, p.ctx, p.n_ctx)  # (N, L, w_t)
        return self._text_forward(x, self.backbone.eot_index(tokens))

    # ------------------------------------------------------------------ image side
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E) with the projected visual prompts appended and replaced per depth."""
        bb = self.backbone
        x = bb.image_embed(images)  # (B, 1 + P, w_v), after ln_pre
        n = self.prompt.n_ctx
        vis = bb.ln_pre(self.proj(self.prompt.ctx)).to(x.dtype)  # (n, w_v): appended before ln_pre
        x = torch.cat([x, vis.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)  # (B, 1 + P + n, w_v)

        def block_fn(i: int, h: torch.Tensor) -> torch.Tensor:  # before image block i (0-based)
            k = self.image_slot.get(i)
            if k is not None:
                deep = self.deep_proj[k](self.deep_text[k]).to(h.dtype)  # (n, w_v)
                h = torch.cat([h[:, :-n], deep.unsqueeze(0).expand(h.shape[0], -1, -1)], dim=1)
            return h

        return bb.image_forward(x, block_fn)

    def describe(self) -> dict[str, Any]:
        n_img, n_txt = self.backbone.info.n_image_blocks, self.backbone.info.n_text_blocks
        return {
            "prompt_depth": self.depth,
            "prompt_depth_rule": f"explicit, or map_depth({REFERENCE_PROMPT_DEPTH}, {n_txt}) by default",
            "text_layers_prompted": list(range(1, self.depth + 1)),
            "image_layers_prompted": [1]
            + [coupled_image_block(j, n_img, n_txt) for j in range(2, self.depth + 1)],
            "n_ctx": self.prompt.n_ctx,
            "ctx_init": self.prompt.prefix_text if self.config.ctx_init else None,
        }
