"""Zero-shot CLIP: the dataset's hand-written template, no training. The floor of every table.

Trainable parameters: none.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.config import MethodConfig
from peftbench.method import Method
from peftbench.registry import register_method


@dataclass(frozen=True)
class ZeroShotConfig(MethodConfig):
    epochs: int | None = 0  # no training


@register_method("zeroshot")
class ZeroShot(Method):
    """Frozen CLIP with the dataset's template (protocols.md lists them). Nothing is trainable."""

    Config = ZeroShotConfig
    identity_at_init = True
    template_policy = "the dataset's hand-written template"
