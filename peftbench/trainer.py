"""One training loop for every method.

    fit(model, task, data, cfg, env, seed)

- optimises exactly `model.trainable_parameters()` with the optimiser and schedule of the
  method's config (SGD / Adam / AdamW; warm-up then cosine, constant or exponential decay;
  length in epochs or iterations);
- AMP on CUDA (bf16 where supported, else fp16 with a grad scaler); fp32 on CPU;
- gradient clipping; a NaN/inf guard that stops the run (recorded as failed, with the reason);
- a rich progress bar on stderr with the loss and images/s;
- optional epoch checkpoints so that an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from peftbench.config import MethodConfig
from peftbench.errors import NonFiniteLoss
from peftbench.task import DataEnv, Task, TaskData


@dataclass
class TrainStats:
    steps: int = 0
    epochs: float = 0.0
    steps_per_epoch: int = 0
    seconds: float = 0.0
    final_loss: float | None = None
    images_per_s: float | None = None
    resumed_from_step: int = 0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; deterministic kernels where torch offers them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pick_device(requested: str | None = None) -> torch.device:
    """`auto` (or None): CUDA when present, else CPU."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def build_optimizer(cfg: MethodConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(cfg: MethodConfig, step: int, total: int, warmup: int) -> float:
    """Learning rate at `step` as a multiple of cfg.lr (warm-up, then the schedule)."""
    if step < warmup:
        if cfg.warmup_type == "constant":
            return cfg.warmup_lr / cfg.lr if cfg.lr > 0 else 0.0
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "exponential":
        return cfg.final_lr_ratio**progress
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def plan_steps(cfg: MethodConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total optimiser steps, warm-up steps) from the config's epochs or iterations."""
    if cfg.iterations is not None:
        total = cfg.iterations
    else:
        total = (cfg.epochs or 0) * steps_per_epoch
    warmup = cfg.warmup_iters or int(round(cfg.warmup_epochs * steps_per_epoch))
    return total, min(warmup, total)


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def fit(
    model,
    task: Task,
    data: TaskData,
    cfg: MethodConfig,
    env: DataEnv,
    seed: int,
    checkpoint: Path | None = None,
    progress: bool = True,
    description: str = "train",
    on_step: Callable[[int, float], None] | None = None,
) -> TrainStats:
    """Train `model` in place; returns what happened. Raises NonFiniteLoss on NaN/inf.

    `on_step(step, loss)`, if given, is called after every optimiser step (steps count from 1);
    a probe that evaluates there must restore `model.train()` before it returns."""
    stats = TrainStats()
    params = model.trainable_parameters()
    seed_everything(seed)
    loader = task.train_loader(data, cfg.batch_size, seed, env)
    stats.steps_per_epoch = len(loader)
    total, warmup = plan_steps(cfg, len(loader))
    if not params or total == 0:
        return stats

    device = env.device
    optimizer = build_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, total, warmup))
    use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    step = 0
    if checkpoint is not None and checkpoint.exists():
        step = _load_checkpoint(checkpoint, model, optimizer, scheduler, scaler)
        stats.resumed_from_step = step
    model.train()
    t0 = time.perf_counter()
    n_images = 0
    console = Console(file=sys.stderr)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[ips]} img/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not progress,
        transient=True,
    )
    with bar:
        bar_task = bar.add_task(description, total=total, completed=step, loss="-", ips="-")
        epoch = step // len(loader)
        while step < total:
            # Re-seed per epoch so a resumed run sees the same batches as an uninterrupted one.
            _reseed_loader(loader, seed, epoch)
            for batch in loader:
                if step >= total:
                    break
                batch = _to_device(batch, device)
                with _autocast(device, cfg.amp):
                    loss = task.loss(model, batch)
                    extra = model.regularizer()
                    if extra is not None:
                        loss = loss + extra
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"loss became {loss.item()} at step {step} (lr {scheduler.get_last_lr()[0]:.3g})"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                n_images += batch[0].shape[0]
                stats.final_loss = float(loss.detach())
                if on_step is not None:
                    on_step(step, stats.final_loss)
                elapsed = time.perf_counter() - t0
                bar.update(
                    bar_task,
                    advance=1,
                    loss=f"{stats.final_loss:.4f}",
                    ips=f"{n_images / max(elapsed, 1e-9):.0f}",
                )
            epoch += 1
            if checkpoint is not None and step < total:
                _save_checkpoint(checkpoint, model, optimizer, scheduler, scaler, step)
    model.eval()
    stats.steps = step
    stats.epochs = step / len(loader)
    stats.seconds = time.perf_counter() - t0
    stats.images_per_s = n_images / stats.seconds if stats.seconds > 0 else None
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    return stats


def _reseed_loader(loader, seed: int, epoch: int) -> None:
    gen = getattr(loader, "generator", None)
    if gen is not None:
        gen.manual_seed(seed * 1000003 + epoch)
    sampler = getattr(loader, "batch_sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _to_device(batch, device):
    return [b.to(device, non_blocking=True) if torch.is_tensor(b) else b for b in batch]


def _save_checkpoint(path: Path, model, optimizer, scheduler, scaler, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "step": step,
            "model": model.trainable_state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        },
        tmp,
    )
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_trainable_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    random.setstate(ckpt["rng"]["python"])
    return int(ckpt["step"])
