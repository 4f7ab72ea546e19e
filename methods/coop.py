"""CoOp: learned context vectors in front of (or around) the class name.

Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022.
Official code read for this port: KaiyangZhou/CoOp, `trainers/coop.py` (PromptLearner, TextEncoder)
and `configs/trainers/CoOp/vit_b16*.yaml`.

Trainable: the context vectors only, M x w_t (generic) or C x M x w_t (class-specific, CSC).
ViT-B/16, M=16, generic: 16 x 512 = 8,192. CLIP (both towers) stays frozen; the image tower is
untouched, so on retrieval tasks CoOp ranks plain CLIP image embeddings and only its text side
trains through the task's loss.

Text-template policy: the dataset's hand-written template is *not* used. Each class prompt is the
tokenised text "<context> <class name>." where the M context positions hold learned vectors
(initialised N(0, 0.02), or from the word embeddings of `ctx_init`); `prompts()` shows them as
"X X ... X <class>." (as the official code prints them) or with the `ctx_init` phrase.

The helpers here (`ContextPrompts`, `prompt_tokens`) are shared with CoCoOp and MaPLe.
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
from peftbench.errors import ConfigError, UsageError
from peftbench.method import Method, classname_text
from peftbench.registry import register_method

POSITIONS = ("end", "middle", "front")


# ------------------------------------------------------------------------------ shared helpers
def n_tokens(backbone: Backbone, text: str) -> int:
    """Number of BPE tokens of `text`, without start/end-of-text."""
    tokens = backbone.tokenize([text])  # (1, L)
    return int(backbone.eot_index(tokens)[0]) - 1


def prompt_tokens(
    backbone: Backbone, prefix_text: str, names: Sequence[str], n_ctx: int, field: str = "n_ctx"
) -> tuple[torch.Tensor, list[int]]:
    """Token ids (C, L) of "<prefix_text> <name>." and each name's token count.

    The first `n_ctx` tokens after start-of-text are the positions the learned context replaces.
    Raises ConfigError naming `field` when a prompt does not fit the text context (the tokenizer
    would silently truncate it).
    """
    length = backbone.context_length
    n_prefix = n_tokens(backbone, prefix_text)
    name_lens = []
    for name in names:
        n_name = n_tokens(backbone, name)
        needed = 1 + n_prefix + n_name + 1 + 1  # SOT + prefix + name + "." + EOT
        if needed > length:
            raise ConfigError(
                field,
                f"the prompt for class {name!r} needs {needed} tokens (start + {n_prefix} context/prefix + "
                f"{n_name} name + '.' + end) but the text context holds {length}; use fewer context tokens "
                f"(got {n_ctx}) or a backbone with a longer context",
            )
        name_lens.append(n_name)
    tokens = backbone.tokenize([f"{prefix_text} {name}." for name in names])  # (C, L)
    return tokens, name_lens


def phrase_vectors(backbone: Backbone, phrase: str, n: int) -> torch.Tensor:
    """Word embeddings (n, w_t) of the first n tokens of `phrase` (after start-of-text)."""
    with torch.no_grad():
        emb = backbone.token_embed(backbone.tokenize([phrase]))  # (1, L, w_t)
    return emb[0, 1 : 1 + n].detach().clone()


class ContextPrompts(nn.Module):
    """Learned context vectors placed into the token embeddings of fixed class prompts.

    The prompt text is "<prefix_text> <name>." and the `n_ctx` tokens after start-of-text are
    replaced by `ctx` ("end" position, CoOp's default). With "middle" / "front" the class-name
    tokens move as in CoOp's PromptLearner.forward (requires `prefix_text` to be exactly n_ctx tokens).
    Only `ctx` is a parameter; the token ids are a plain tensor (recomputed from the class names at
    build time, never saved), and the backbone is passed in, not owned.
    """

    def __init__(
        self,
        backbone: Backbone,
        names: Sequence[str],
        n_ctx: int,
        prefix_text: str,
        ctx_init: torch.Tensor,
        position: str = "end",
        field: str = "n_ctx",
    ):
        super().__init__()
        self.n_ctx = n_ctx
        self.prefix_text = prefix_text
        self.position = position
        self.field = field
        self.tokens, self.name_lens = prompt_tokens(backbone, prefix_text, names, n_ctx, field)  # (C, L)
        self.ctx = nn.Parameter(ctx_init)  # (M, w_t) generic or (C, M, w_t) class-specific

    @property
    def n_cls(self) -> int:
        return self.tokens.shape[0]

    def eot_index(self, backbone: Backbone) -> torch.Tensor:
        """(C,) end-of-text positions (unchanged by moving the class name within the prompt)."""
        return backbone.eot_index(self.tokens.to(backbone.device))

    def embed(self, backbone: Backbone, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt token embeddings (C, L, w_t) with `ctx` (default: the learned one) inserted."""
        ctx = self.ctx if ctx is None else ctx
        return insert_context(backbone, self.tokens, self.name_lens, ctx, self.n_ctx, self.position)


def insert_context(
    backbone: Backbone,
    tokens: torch.Tensor,
    name_lens: Sequence[int],
    ctx: torch.Tensor,
    n_ctx: int,
    position: str = "end",
) -> torch.Tensor:
    """Token embeddings of `tokens` (C, L) with the n_ctx positions after start-of-text replaced.

    `ctx`: (M, w_t) shared by all classes or (C, M, w_t) one per class. "end": SOT ctx name . EOT;
    "middle": SOT ctx[:M//2] name ctx[M//2:] . EOT; "front": SOT name ctx . EOT (CoOp's
    PromptLearner.forward). Returns (C, L, w_t); the end-of-text position does not move.
    """
    with torch.no_grad():
        emb = backbone.token_embed(tokens.to(backbone.device))  # (C, L, w_t)
    n_cls = emb.shape[0]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)  # (C, M, w_t)
    ctx = ctx.to(emb.dtype)
    prefix, suffix = emb[:, :1], emb[:, 1 + n_ctx :]  # (C, 1, w_t), (C, L-1-M, w_t): SOT | name . EOT pad
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1)  # (C, L, w_t)
    rows = []
    half = n_ctx // 2
    for i, n_name in enumerate(name_lens):
        name_i, rest_i = suffix[i, :n_name], suffix[i, n_name:]  # (n, w_t), (*, w_t)
        if position == "middle":
            parts = [prefix[i], ctx[i, :half], name_i, ctx[i, half:], rest_i]
        else:  # front
            parts = [prefix[i], name_i, ctx[i], rest_i]
        rows.append(torch.cat(parts, dim=0))
    return torch.stack(rows)  # (C, L, w_t)


# ------------------------------------------------------------------------------ CoOp
def coop_epochs(shots: int, dataset: str) -> int:
    """CoOp's epochs by shots (scripts/coop/main.sh + configs vit_b16_ep{50,100,200}): ImageNet 50."""
    if dataset.lower() == "imagenet":
        return 50
    if shots <= 1:
        return 50
    if shots <= 4:
        return 100
    return 200


@dataclass(frozen=True)
class CoOpConfig(MethodConfig):
    """CoOp defaults: trainers/coop.py + configs/trainers/CoOp/vit_b16*.yaml (KaiyangZhou/CoOp)."""

    n_ctx: int = 16  # TRAINER.COOP.N_CTX (scripts/coop/main.sh NCTX=16); ignored when ctx_init is set
    ctx_init: str = ""  # TRAINER.COOP.CTX_INIT; "" = random N(0, init_std); e.g. "a photo of a"
    csc: bool = False  # TRAINER.COOP.CSC: class-specific context (main.sh CSC=False)
    class_token_position: str = "end"  # TRAINER.COOP.CLASS_TOKEN_POSITION: end | middle | front
    init_std: float = 0.02  # nn.init.normal_(ctx_vectors, std=0.02)
    optimizer: str = "sgd"  # OPTIM.NAME
    lr: float = 0.002  # OPTIM.LR
    weight_decay: float = 5e-4  # Dassl default OPTIM.WEIGHT_DECAY
    momentum: float = 0.9  # Dassl default OPTIM.MOMENTUM
    batch_size: int = 32  # DATALOADER.TRAIN_X.BATCH_SIZE
    epochs: int | None = None  # OPTIM.MAX_EPOCH: 50 (1 shot), 100 (2, 4), 200 (8, 16); ImageNet 50
    schedule: str = "cosine"  # OPTIM.LR_SCHEDULER
    warmup_epochs: float = 1.0  # OPTIM.WARMUP_EPOCH
    warmup_type: str = "constant"  # OPTIM.WARMUP_TYPE
    warmup_lr: float = 1e-5  # OPTIM.WARMUP_CONS_LR

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "n_ctx", isinstance(self.n_ctx, int) and self.n_ctx >= 1, "must be an integer >= 1")
        check(
            self,
            "class_token_position",
            self.class_token_position in POSITIONS,
            f"must be one of {', '.join(POSITIONS)}",
        )
        check(self, "init_std", self.init_std > 0, "must be > 0")

    def resolve(self, ctx: RunContext) -> CoOpConfig:
        if self.epochs is None:
            return dataclasses.replace(self, epochs=coop_epochs(ctx.shots, ctx.dataset))
        return self


def init_context(
    backbone: Backbone, ctx_init: str, n_ctx: int, init_std: float
) -> tuple[int, str, torch.Tensor]:
    """(M, prefix text, context vectors (M, w_t)): from a phrase's word embeddings, or N(0, std).

    Official: M = number of words of CTX_INIT; here the number of its BPE tokens (the same for
    "a photo of a", and correct for phrases whose words split into pieces). Random init uses
    "X" placeholders, as the official code does.
    """
    phrase = classname_text(ctx_init).strip()
    if phrase:
        n = n_tokens(backbone, phrase)
        if n < 1:
            raise ConfigError("ctx_init", f"phrase {ctx_init!r} has no tokens")
        return n, phrase, phrase_vectors(backbone, phrase, n)  # (M, w_t)
    vectors = torch.empty(n_ctx, backbone.text_width, device=backbone.device)  # (M, w_t)
    nn.init.normal_(vectors, std=init_std)
    return n_ctx, " ".join(["X"] * n_ctx), vectors


@register_method("coop")
class CoOp(Method):
    """CoOp (Zhou et al., IJCV 2022): M learned context vectors before the class-name tokens.

    Trainable: `prompt.ctx`, (M, w_t) generic or (C, M, w_t) with CSC; 8,192 on ViT-B/16 (M=16).
    Text features are taken at the end-of-text token, then the text projection; logits are
    exp(logit_scale) * cosine (the base class's `logits`).
    Deviation: with `ctx_init` and `csc` both set, each class gets its own copy of the phrase's
    embeddings (the official code silently ignores CSC when CTX_INIT is given).
    """

    Config = CoOpConfig
    tasks = ("classification", "ucdr")
    mergeable = False
    identity_at_init = False
    template_policy = "learned context: '<M context vectors> <class>.'; the dataset template is not used"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        config: CoOpConfig | None = None,
        template: str = "a photo of a {}.",
    ):
        super().__init__(backbone, classnames, config, template)
        cfg = self.config
        n_ctx, prefix_text, vectors = init_context(backbone, cfg.ctx_init, cfg.n_ctx, cfg.init_std)
        if cfg.csc:
            vectors = vectors.unsqueeze(0).repeat(len(self.classnames), 1, 1)  # (C, M, w_t)
            if not classname_text(cfg.ctx_init).strip():  # random init: an independent draw per class
                nn.init.normal_(vectors, std=cfg.init_std)
        self.prompt = ContextPrompts(
            backbone, self.classnames, n_ctx, prefix_text, vectors, cfg.class_token_position
        )

    # ------------------------------------------------------------------ text side
    def prompts(self) -> list[str]:
        return [f"{self.prompt.prefix_text} {c}." for c in self.classnames]

    def _learned_class_features(self) -> torch.Tensor:
        x = self.prompt.embed(self.backbone)  # (C, L, w_t)
        return self.backbone.text_forward(x, self.prompt.eot_index(self.backbone))  # (C, E)

    def class_text_features(self) -> torch.Tensor:
        """(C, E) text features of the learned prompts (recomputed in training, cached in eval)."""
        if self.training:
            return self._learned_class_features()
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = self._learned_class_features()
        return self._text_cache

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Class names -> (N, E) through the learned (generic) context: '<context> <name>.'."""
        if self.prompt.ctx.dim() == 3:
            raise UsageError(
                "coop with csc=true has one context per training class; it cannot encode other names"
            )
        names = [classname_text(t) for t in texts]
        p = self.prompt
        tokens, name_lens = prompt_tokens(self.backbone, p.prefix_text, names, p.n_ctx)  # (N, L)
        x = insert_context(self.backbone, tokens, name_lens, p.ctx, p.n_ctx, p.position)  # (N, L, w_t)
        return self.backbone.text_forward(x, self.backbone.eot_index(tokens))  # (N, E)

    def describe(self) -> dict[str, Any]:
        return {
            "n_ctx": self.prompt.n_ctx,
            "ctx_init": self.prompt.prefix_text if self.config.ctx_init else None,
            "csc": self.config.csc,
            "class_token_position": self.config.class_token_position,
        }
