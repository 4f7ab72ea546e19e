"""The frozen CLIP backbone: the only module that knows open_clip's internals.

Targets open_clip_torch 3.3.0 (pinned in pyproject.toml; `tests/test_backbone.py` guards the
module layout relied on here). Methods never fork open_clip: they reach its towers through the
handles of :class:`Backbone` and wrap or replace submodules via :func:`replace_submodule`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import nn
from torchvision import transforms as T

from peftbench.errors import UsageError

log = logging.getLogger(__name__)

CROP_SCALE = (0.08, 1.0)  # CoOp / Dassl random_resized_crop default area range

# Backbones that ship with peftbench: name -> (open_clip config JSON, default weights file).
# The embedded world registers "synth-tiny" here (peftbench/synth/__init__.py).
_SHIPPED: dict[str, tuple[Path, Path | None]] = {}


def register_shipped_backbone(name: str, config_json: Path, weights: Path | None) -> None:
    """Make an open_clip JSON config loadable by `name`, with optional default weights."""
    _SHIPPED[name] = (Path(config_json), Path(weights) if weights else None)


def list_backbones() -> list[str]:
    """Shipped backbones first, then every architecture open_clip knows."""
    _load_shipped()
    return list(_SHIPPED) + [m for m in open_clip.list_models() if m not in _SHIPPED]


def _load_shipped() -> None:
    import peftbench.synth  # noqa: F401  (registers the embedded backbone)


@dataclass
class BackboneInfo:
    """What was loaded, as written into run records."""

    name: str
    pretrained: str | None
    quick_gelu: bool
    vision_width: int
    text_width: int
    embed_dim: int
    n_image_blocks: int
    n_text_blocks: int
    image_size: int
    context_length: int
    notes: list[str] = field(default_factory=list)


class Backbone(nn.Module):
    """A frozen open_clip CLIP (eval mode, no gradients) plus the handles methods need.

    Image path:  images -> image_embed -> image_blocks -> image_pool (ln_post) -> image_project
    Text path:   tokens -> token_embed (+pos) -> text_blocks (causal mask) -> ln_final
                 -> pooled at the end-of-text token -> text_project
    Each step is exposed so prompt methods can enter the text path from token embeddings and
    insert tokens between blocks, and agent methods can wrap sub-layers in place.
    """

    def __init__(self, model: nn.Module, info: BackboneInfo, tokenizer, preprocess_eval, mean, std):
        super().__init__()
        self.model = model
        self.info = info
        self.tokenizer = tokenizer
        self.eval_transform = preprocess_eval
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_transform = self.make_train_transform()
        freeze(self)

    def make_train_transform(self, crop_scale: tuple[float, float] = CROP_SCALE) -> T.Compose:
        """CoOp's train augmentation: random resized crop (bicubic) + horizontal flip + CLIP norm.

        `crop_scale` is the crop's area range; a dataset may declare another (recorded in the run).
        """
        return T.Compose(
            [
                T.RandomResizedCrop(
                    self.info.image_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC
                ),
                T.RandomHorizontalFlip(),
                T.Lambda(_to_rgb),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    # ----------------------------------------------------------------- towers and handles
    @property
    def visual(self) -> VisionTransformer:
        return self.model.visual

    @property
    def text(self) -> nn.Module:
        """The module holding the text tower's parts (the CLIP itself, or CustomTextCLIP.text)."""
        return self.model if isinstance(self.model, CLIP) else self.model.text

    @property
    def image_blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def text_blocks(self) -> nn.ModuleList:
        return self.text.transformer.resblocks

    @property
    def ln_pre(self) -> nn.LayerNorm:
        """The image tower's LayerNorm before the blocks (image_embed applies it per token)."""
        return self.visual.ln_pre

    @property
    def ln_post(self) -> nn.LayerNorm:
        return self.visual.ln_post

    @property
    def ln_final(self) -> nn.LayerNorm:
        return self.text.ln_final

    @property
    def image_projection(self) -> nn.Parameter:
        """(vision_width, embed_dim), used as `pooled @ proj`."""
        return self.visual.proj

    @property
    def text_projection(self) -> nn.Parameter:
        """(text_width, embed_dim), used as `pooled @ text_projection`."""
        return self.text.text_projection

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def vision_width(self) -> int:
        return self.info.vision_width

    @property
    def text_width(self) -> int:
        return self.info.text_width

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    @property
    def context_length(self) -> int:
        return self.info.context_length

    @property
    def device(self) -> torch.device:
        return self.image_projection.device

    # ----------------------------------------------------------------- text path
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, context_length) token ids on the backbone's device."""
        return self.tokenizer(list(texts)).to(self.device)

    def token_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings without positions. (N, L) -> (N, L, D_t)"""
        return self.text.token_embedding(tokens)

    def text_forward(
        self,
        x: torch.Tensor,
        eot_index: torch.Tensor,
        block_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the text tower from token embeddings (N, L, D_t) to joint embeddings (N, E).

        Positional embeddings are added here. `block_fn(i, x)` runs before block i and may
        rewrite tokens (deep prompts); `eot_index` (N,) says where to pool.
        """
        x = x + self.text.positional_embedding.to(x.dtype)  # (N, L, D_t)
        mask = self.text.attn_mask
        for i, block in enumerate(self.text_blocks):
            if block_fn is not None:
                x = block_fn(i, x)
            x = block(x, attn_mask=mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]  # (N, D_t)
        return self.text_project(pooled)

    def text_project(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = self.text_projection
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the end-of-text token (the highest id, open_clip's 'argmax' pooling)."""
        return tokens.argmax(dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised joint embeddings (N, E) of token ids (N, L)."""
        return self.text_forward(self.token_embed(tokens), self.eot_index(tokens))

    # ----------------------------------------------------------------- image path
    def image_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class + position embeddings after ln_pre. (B, 3, H, W) -> (B, 1 + P, D_v)"""
        return self.visual._embeds(images)

    def image_forward(
        self,
        x: torch.Tensor,
        block_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the image blocks on tokens (B, N, D_v) and return joint embeddings (B, E).

        `block_fn(i, x)` runs before block i (deep visual prompts). Only the class token is
        pooled, so extra tokens appended after the patches do not change the pooling.
        """
        for i, block in enumerate(self.image_blocks):
            if block_fn is not None:
                x = block_fn(i, x)
            x = block(x)
        return self.image_project(self.image_pool(x))

    def image_pool(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post and pooling. (B, N, D_v) -> (B, D_v)"""
        pooled, _ = self.visual._pool(x)
        return pooled

    def image_project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.image_projection

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised joint embeddings (B, E) of normalised images (B, 3, H, W)."""
        return self.image_forward(self.image_embed(images))

    # ----------------------------------------------------------------- utilities
    def copy(self) -> Backbone:
        """An independent deep copy (methods that rewrite submodules get their own)."""
        return copy.deepcopy(self)

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """The wrapped open_clip model's state dict, keys exactly as open_clip names them."""
        return {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}

    def train(self, mode: bool = True) -> Backbone:
        """CLIP's own modules stay in eval mode; modules a method inserted follow `mode`."""
        for m in self.modules():
            m.training = False
        if mode:
            for m in self.modules():
                if getattr(m, "_peftbench_owned", False):
                    m.train(True)
        return self


def freeze(module: nn.Module) -> None:
    """Freeze every parameter of `module` and put it in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def _to_rgb(img):
    return img.convert("RGB") if hasattr(img, "convert") else img


def block_parts(block: nn.Module) -> dict[str, nn.Module]:
    """The sub-layers of a standard open_clip residual block.

    Keys: ln_1, attn (nn.MultiheadAttention, fused in_proj_weight (3D, D) and out_proj),
    ln_2, c_fc, c_proj. The residual form is
        x = x + ls_1(attn(ln_1(x)));  x = x + ls_2(c_proj(gelu(c_fc(ln_2(x)))))
    Wrapping `attn` sees the attention output after out_proj (a hook on out_proj never fires:
    nn.MultiheadAttention reads its weights directly).
    """
    if not isinstance(block, ResidualAttentionBlock):
        raise UsageError(
            f"this method needs standard open_clip transformer blocks, got {type(block).__name__}; "
            "use a ViT open_clip architecture without custom blocks"
        )
    return {
        "ln_1": block.ln_1,
        "attn": block.attn,
        "ln_2": block.ln_2,
        "c_fc": block.mlp.c_fc,
        "c_proj": block.mlp.c_proj,
    }


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted `path` under `root`; returns the old one.

    The new module is marked as the method's own: it follows train/eval mode, while CLIP's
    modules stay in eval mode (see Backbone.train).
    """
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    new._peftbench_owned = True
    setattr(parent, name, new)
    return old


def restore_submodule(root: nn.Module, path: str, original: nn.Module) -> None:
    """Put a CLIP module back at `path` (undoing replace_submodule when merging): it is CLIP's
    again, so it stays in eval mode."""
    replace_submodule(root, path, original)
    original._peftbench_owned = False


def attn_forward(
    attn: nn.MultiheadAttention,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    q_delta=None,
    k_delta=None,
    v_delta=None,
) -> torch.Tensor:
    """Self-attention of open_clip's fused MultiheadAttention, with optional additive deltas
    on q, k, v (B, N, D) before the heads are split (LoRA). Returns the output after out_proj.
    """
    b, n, d = x.shape
    h = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, N, D)
    if q_delta is not None:
        q = q + q_delta
    if k_delta is not None:
        k = k + k_delta
    if v_delta is not None:
        v = v + v_delta
    q, k, v = (t.view(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d_h)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, d_h)
    out = out.transpose(1, 2).reshape(b, n, d)
    return attn.out_proj(out)


# --------------------------------------------------------------------------------- loading
_OFFLINE_HINT = (
    "cannot fetch pretrained weights '{tag}' for {name} (offline?). Download them elsewhere and pass "
    "the file: --pretrained /path/to/open_clip_pytorch_model.bin (or .pt/.safetensors), or set "
    "HF_HUB_OFFLINE=1 with a populated Hugging Face cache"
)


def load_backbone(
    name: str = "synth-tiny",
    pretrained: str | None = "default",
    device: str | torch.device = "cpu",
    **model_kwargs,
) -> Backbone:
    """Build a frozen open_clip CLIP.

    name: an open_clip architecture ("ViT-B-16"), a shipped backbone ("synth-tiny"), or a path to
        an open_clip model-config JSON ({"embed_dim", "vision_cfg", "text_cfg"}).
    pretrained: an open_clip tag ("openai", "laion2b_s34b_b88k"), a local checkpoint file, None for
        random weights (shape and parameter-count checks), or "default": the shipped weights of a
        shipped backbone, random weights otherwise.
    The OpenAI tags were trained with QuickGELU: QuickGELU is forced for them and recorded.
    """
    _load_shipped()
    notes: list[str] = []
    arch = name
    if name in _SHIPPED:
        cfg_path, weights = _SHIPPED[name]
        open_clip.add_model_config(cfg_path)
        arch = cfg_path.stem
        if pretrained == "default":
            pretrained = str(weights) if weights else None
    elif name.endswith(".json") or os.path.sep in name:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"backbone config file not found: {path}")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"backbone config {path} is not valid JSON: {e}") from e
        open_clip.add_model_config(path)
        arch = path.stem
    if pretrained == "default":
        pretrained = None
    if arch not in open_clip.list_models():
        raise UsageError(_unknown_backbone(name))

    quick_gelu = False
    is_file = pretrained is not None and (os.path.sep in pretrained or Path(pretrained).suffix != "")
    if pretrained is not None and is_file and not Path(pretrained).is_file():
        raise UsageError(f"pretrained weights file not found: {pretrained}")
    if pretrained is not None and not is_file:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            raise UsageError(
                f"unknown pretrained tag {pretrained!r} for {arch}; choices: {', '.join(tags) or 'none'} "
                "(or a local weights file)"
            )
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        model_cfg = open_clip.get_model_config(arch) or {}
        if tag_cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
            quick_gelu = True
            notes.append(f"QuickGELU forced: the {pretrained!r} weights were trained with it")
    if arch.endswith("-quickgelu"):
        quick_gelu = True

    try:
        # Random initialisation (pretrained=None) is seeded, so a weightless backbone is reproducible.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
            model, _, preprocess_eval = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu, **model_kwargs
            )
    except RuntimeError as e:
        if "download" in str(e).lower() or "connect" in str(e).lower():
            raise UsageError(_OFFLINE_HINT.format(tag=pretrained, name=arch)) from e
        raise
    if not isinstance(model, (CLIP, CustomTextCLIP)) or not isinstance(model.visual, VisionTransformer):
        raise UsageError(
            f"{name}: peftbench supports open_clip ViT CLIP models (got {type(model).__name__} with "
            f"{type(model.visual).__name__} image tower)"
        )
    text = model if isinstance(model, CLIP) else model.text
    if isinstance(model, CustomTextCLIP) and not isinstance(text, TextTransformer):
        raise UsageError(f"{name}: text towers other than open_clip's TextTransformer are not supported")
    pool = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
    if pool != "argmax":
        raise UsageError(f"{name}: text pooling {pool!r} is not supported (peftbench pools at EOT, 'argmax')")
    if getattr(model.visual, "attn_pool", None) is not None:
        raise UsageError(f"{name}: attention-pooled image towers are not supported")

    tokenizer = open_clip.get_tokenizer(arch)
    pp = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    info = BackboneInfo(
        name=name,
        pretrained=pretrained,
        quick_gelu=quick_gelu,
        vision_width=model.visual.transformer.width,
        text_width=text.transformer.width,
        embed_dim=model.visual.output_dim,
        n_image_blocks=len(model.visual.transformer.resblocks),
        n_text_blocks=len(text.transformer.resblocks),
        image_size=int(image_size),
        context_length=int(
            text.context_length if hasattr(text, "context_length") else text.attn_mask.shape[0]
        ),
        notes=notes,
    )
    mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pp.get("std", open_clip.OPENAI_DATASET_STD)
    return Backbone(model, info, tokenizer, preprocess_eval, mean, std).to(device)


def _unknown_backbone(name: str) -> str:
    from peftbench.registry import closest

    choices = list_backbones()
    hint = closest(name, choices)
    shown = ", ".join(list(_SHIPPED) + ["ViT-B-16", "ViT-B-32", "ViT-L-14", "..."])
    return (
        f"unknown backbone {name!r}{f' (did you mean {hint!r}?)' if hint else ''}; choices: {shown} "
        "(`peftbench list backbones` shows all), or a path to an open_clip config JSON"
    )
