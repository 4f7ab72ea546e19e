"""MAIL speed: merged inference vs frozen CLIP, the unmerged overhead, and the train step vs LoRA.

    .venv/bin/python bench/mail_speed.py                       # ViT-B/16, random weights, batch 4
    .venv/bin/python bench/mail_speed.py --backbone synth-tiny --batch 32 --reps 50

Inference: image encoding of one batch (class text features are cached at deployment), frozen CLIP,
merged MAIL and unmerged MAIL timed in interleaved rounds (the order rotates every round)
so that load changes on a shared machine hit all three alike; medians over the rounds. The merged
model is a plain CLIP of the same architecture, so its ratio to frozen CLIP must be ~1 (<= 1.02).
Train step: one optimiser step (logits over the class prompts, cross-entropy, backward, AdamW) of
MAIL (default config: rank 32, projections trained) and of LoRA (methods/lora.py defaults), also
interleaved. Not a timed test: run it by hand and paste the table into docs/mail.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see peftbench/__init__.py

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from peftbench.backbone import load_backbone
from peftbench.config import RunContext
from peftbench.registry import METHODS, load_plugins

CLASSES = [f"class {i}" for i in range(10)]


def build(name: str, backbone, task: str = "classification"):
    cls = METHODS[name]
    i = backbone.info
    ctx = RunContext(
        task, "bench", 16, 1, i.n_image_blocks, i.n_text_blocks, i.vision_width, i.text_width, i.embed_dim
    )
    return cls(backbone, CLASSES, cls.Config().resolve(ctx))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(reps):
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:  # rotate the order every round
            times[k].append(timed(fns[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_fn(model, images, labels):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model.logits(images), labels)
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--train-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_plugins()
    torch.manual_seed(0)
    bb = load_backbone(args.backbone, None if args.backbone.startswith("ViT") else "default")
    size = bb.info.image_size
    x = torch.randn(args.batch, 3, size, size)
    mail = build("mail", bb.copy()).eval()
    merged = mail.merge().eval()
    with torch.no_grad():
        inf = interleaved(
            {
                "frozen": lambda: bb.encode_image(x),
                "merged": lambda: merged.encode_image(x),
                "unmerged": lambda: mail.encode_image(x),
            },
            args.reps,
        )
    threads = torch.get_num_threads()
    print(
        f"backbone {args.backbone} (weights: {'random' if args.backbone.startswith('ViT') else 'shipped'}), "
        f"batch {args.batch}, {args.reps} interleaved rounds, {threads} torch threads, CPU"
    )
    print("\n| measurement | median ms | ratio (inference: to frozen CLIP; train: to LoRA) |\n|---|---|---|")
    for k in ("frozen", "merged", "unmerged"):
        print(f"| inference, {k} | {inf[k] * 1e3:.1f} | {inf[k] / inf['frozen']:.3f} |")
    labels = torch.arange(args.batch) % len(CLASSES)
    steps = {"mail": train_step_fn(build("mail", bb.copy()), x, labels)}
    if "lora" in METHODS:
        steps["lora"] = train_step_fn(build("lora", bb.copy()), x, labels)
    else:
        print("\nLoRA (methods/lora.py) is not registered: train step reported for MAIL only")
    train = interleaved(steps, args.train_reps, warmup=1)
    for k, v in train.items():
        extra = f"{v / train['lora']:.3f} x LoRA" if "lora" in train else "-"
        print(f"| train step, {k} | {v * 1e3:.1f} | {extra} |")
    ratio = inf["merged"] / inf["frozen"]
    print(f"\nmerged / frozen = {ratio:.3f} ({'ok' if ratio <= 1.02 else 'ABOVE 1.02'})")
    return 0 if ratio <= 1.02 else 1


if __name__ == "__main__":
    sys.exit(main())
