"""The Method contract every PEFT method fulfils.

A method is an `nn.Module` built from (backbone, classnames, config). The backbone arrives frozen;
the method adds its own modules (trainable by default) or wraps backbone submodules through
`peftbench.backbone`. The trainer optimises exactly `trainable_parameters()`.

    class MyMethod(Method):
        Config = MyConfig                      # frozen dataclass subclassing MethodConfig
        tasks = ("classification", "ucdr")     # tasks it supports
        mergeable = False                      # True: merge() returns a plain Backbone
        identity_at_init = False               # True: step-0 outputs equal zero-shot CLIP
        template_policy = "..."                # which text template it uses

Outputs: `encode_image` (B, E) and `encode_text` (N, E) are unnormalised joint embeddings;
`class_scores` are cosines (B, C); `logits` = CLIP's logit scale x cosines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.backbone import Backbone
from peftbench.config import MethodConfig
from peftbench.errors import ConfigError, UsageError

EPS = 1e-12  # L2-normalisation epsilon: a zero vector stays zero instead of becoming NaN


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=EPS)


def classname_text(name: str) -> str:
    """Class names become text with underscores replaced by spaces."""
    return name.replace("_", " ")


class Method(nn.Module):
    """Base class: zero-shot CLIP behaviour with hooks to override."""

    name: ClassVar[str] = "?"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    tasks: ClassVar[tuple[str, ...]] = ("classification", "ucdr")
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    template_policy: ClassVar[str] = "the dataset's hand-written template"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        config: MethodConfig | None = None,
        template: str = "a photo of a {}.",
    ):
        super().__init__()
        self.backbone = backbone
        self.classnames = [classname_text(c) for c in classnames]
        self.config = config if config is not None else self.Config()
        self.template = template
        self._text_cache: torch.Tensor | None = None

    # ------------------------------------------------------------------ contract
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the tensors the optimiser sees (everything else is frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def prompts(self) -> list[str]:
        """The class prompts, from this method's template policy."""
        return [self.template.format(c) for c in self.classnames]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E), unnormalised."""
        return self.backbone.encode_image(images)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (N, E), unnormalised, through this method's text path."""
        return self.backbone.encode_text(self.backbone.tokenize(texts))

    def class_text_features(self) -> torch.Tensor:
        """(C, E) unnormalised class embeddings; cached in eval mode (recomputed in training)."""
        if self.training:
            return self.encode_text(self.prompts())
        if self._text_cache is None:
            self._text_cache = self.encode_text(self.prompts()).detach()
        return self._text_cache

    def class_scores(self, image_features: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarity (B, C) of image embeddings to class embeddings."""
        return l2norm(image_features) @ l2norm(self.class_text_features()).t()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) classification logits: CLIP's logit scale x cosine."""
        return self.backbone.logit_scale * self.class_scores(self.encode_image(images), images)

    def prepare(self, train_data: Any) -> None:
        """Build state from the training set before training (Tip-Adapter's cache). Default: none."""

    def after_fit(self, train_data: Any) -> None:
        """Called once training ends, before the state is saved (Tip-Adapter re-searches on val)."""

    def regularizer(self) -> torch.Tensor | None:
        """An extra loss term added to the task's loss (methods may only add regularisers)."""
        return None

    def merge(self) -> Backbone:
        """Fold the method into a plain backbone of unchanged architecture (mergeable methods)."""
        raise UsageError(f"method {self.name!r} cannot be merged into a plain CLIP (mergeable=False)")

    def deployed(self) -> Method:
        """What would be deployed: the merged plain backbone with this method's prompts."""
        return Deployed(self.merge(), self.prompts())

    def describe(self) -> dict[str, Any]:
        """Structural facts resolved at build time (layer mappings), written into the record."""
        return {}

    # ------------------------------------------------------------------ state
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors plus the method's own buffers (caches, searched values)."""
        state = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}
        for n, b in self.named_buffers():
            if not n.startswith("backbone.") or ".peft_" in n:
                state[n] = b.detach().clone()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        missing = set(self.trainable_state_dict()) - set(state)
        unexpected = set(state) - set(own)
        if missing or unexpected:
            raise UsageError(
                f"state does not fit method {self.name!r}: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        with torch.no_grad():
            for n, t in state.items():
                own[n].copy_(t.to(own[n].device, own[n].dtype))
        self._text_cache = None

    def train(self, mode: bool = True) -> Method:
        self._text_cache = None
        return super().train(mode)


class Deployed(Method):
    """A plain (merged) backbone with a fixed list of class prompts: what a merged method ships."""

    name = "deployed"

    def __init__(self, backbone: Backbone, prompts: Sequence[str]):
        super().__init__(backbone, [], None)
        self._prompts = list(prompts)

    def prompts(self) -> list[str]:
        return self._prompts


# ---------------------------------------------------------------------- depth mapping
# The spec's layer numbers are for 12-block towers (DESIGN.md, "Depth-relative layer ranges").
REFERENCE_DEPTH = 12


def map_layer(a: int, n_blocks: int) -> int:
    """1-based layer a of a 12-block tower -> ceil(a * L / 12) on an L-block tower."""
    return max(1, math.ceil(a * n_blocks / REFERENCE_DEPTH))


def map_range(a: int, b: int, n_blocks: int) -> tuple[int, int]:
    """1-based inclusive range [a, b] of a 12-block tower onto an L-block tower."""
    return map_layer(a, n_blocks), map_layer(b, n_blocks)


def map_depth(d: int, n_blocks: int) -> int:
    """A depth d (prompted layers, input included) -> max(1, floor(d * L / 12 + 0.5))."""
    return max(1, math.floor(d * n_blocks / REFERENCE_DEPTH + 0.5))


def coupled_image_block(j: int, n_image: int, n_text: int) -> int:
    """Text block j (1-based) couples with image block ceil(j * L_img / L_txt)."""
    return math.ceil(j * n_image / n_text)


def check_range(name: str, a: int, b: int, n_blocks: int) -> None:
    """Validate an explicit 1-based inclusive layer range against a tower's depth."""
    if not (1 <= a <= b <= n_blocks):
        raise ConfigError(name, f"layer range [{a}, {b}] must satisfy 1 <= start <= end <= {n_blocks}")
