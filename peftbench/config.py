"""Typed configs: the optimisation fields every method config has, overrides and validation.

A method's config is a frozen dataclass subclassing :class:`MethodConfig`, next to the method,
each default commented with its source. YAML files and `--set key=value` only select and
override; unknown keys fail with a suggestion, values are coerced to the field's type, and
`__post_init__` rejects out-of-range values naming the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import yaml

from peftbench.errors import ConfigError, UsageError
from peftbench.registry import closest

C = TypeVar("C")

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "exponential")
WARMUPS = ("constant", "linear")


@dataclass(frozen=True)
class RunContext:
    """What context-dependent defaults may depend on (resolved before hashing)."""

    task: str
    dataset: str
    shots: int
    seed: int
    n_image_blocks: int
    n_text_blocks: int
    vision_width: int
    text_width: int
    embed_dim: int


@dataclass(frozen=True)
class MethodConfig:
    """Optimisation fields shared by every method (the trainer reads these).

    Length: `epochs` (over the task's training loader) or `iterations` (optimiser steps); a
    method sets one. None means "resolved from context" (see `resolve`); 0 means no training.
    """

    optimizer: str = "sgd"
    lr: float = 2e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 32
    epochs: int | None = None
    iterations: int | None = None
    schedule: str = "cosine"  # cosine | constant | exponential (lr * final_lr_ratio ** progress)
    min_lr: float = 0.0  # cosine floor
    final_lr_ratio: float = 1e-3  # exponential schedule: lr ratio reached at the end of the run
    warmup_epochs: float = 0.0  # warm-up length, in epochs (converted to steps by the trainer)
    warmup_iters: int = 0  # or in optimiser steps
    warmup_type: str = "constant"  # constant (CoOp: a fixed warmup_lr) | linear (0 -> lr)
    warmup_lr: float = 1e-5
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    amp: bool = True  # mixed precision on CUDA (bf16 where supported); ignored on CPU

    def __post_init__(self) -> None:
        check(self, "optimizer", self.optimizer in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}")
        check(self, "schedule", self.schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}")
        check(self, "warmup_type", self.warmup_type in WARMUPS, f"must be one of {', '.join(WARMUPS)}")
        check(self, "lr", self.lr >= 0, "must be >= 0")
        check(self, "weight_decay", self.weight_decay >= 0, "must be >= 0")
        check(self, "batch_size", self.batch_size >= 1, "must be >= 1")
        check(self, "epochs", self.epochs is None or self.epochs >= 0, "must be >= 0")
        check(self, "iterations", self.iterations is None or self.iterations >= 0, "must be >= 0")
        check(self, "warmup_epochs", self.warmup_epochs >= 0, "must be >= 0")
        check(self, "warmup_iters", self.warmup_iters >= 0, "must be >= 0")
        check(self, "final_lr_ratio", 0 < self.final_lr_ratio <= 1, "must be in (0, 1]")
        check(self, "grad_clip", self.grad_clip is None or self.grad_clip > 0, "must be > 0 or null")

    def resolve(self, ctx: RunContext) -> MethodConfig:
        """Fill context-dependent defaults (epochs by shots, ranks by task, layer ranges by depth).

        Subclasses override and call `dataclasses.replace`; the result is hashed and recorded.
        """
        return self


def check(cfg: Any, name: str, ok: bool, message: str) -> None:
    """Raise a ConfigError naming `name` when `ok` is false."""
    if not ok:
        raise ConfigError(name, f"{message} (got {getattr(cfg, name, '?')!r})")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["rank=8", "lr=1e-3"]` -> {"rank": 8, "lr": 0.001}; values are YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def build_config(cls: type[C], overrides: dict[str, Any], what: str = "config") -> C:
    """Instantiate config dataclass `cls` with `overrides`, checking names and types."""
    names = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in overrides.items():
        if key not in names:
            hint = closest(key, names)
            did = f" (did you mean {hint!r}?)" if hint else ""
            raise UsageError(f"unknown {what} key {key!r}{did}; valid keys: {', '.join(sorted(names))}")
        kwargs[key] = coerce(key, value, hints[key])
    return cls(**kwargs)


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML-parsed value to the annotated type, or fail naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(name, f"cannot use {value!r} as {tp}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(name, f"expected {len(args)} values, got {value!r}")
            return tuple(coerce(name, v, a) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else Any
        return origin(coerce(name, v, inner) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(name, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(name, f"expected a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
