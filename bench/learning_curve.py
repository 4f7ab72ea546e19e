"""Test accuracy along training, for diagnosing a method that ends below zero-shot.

    python bench/learning_curve.py --method cocoop --steps 960 --every 240 --set warmup_epochs=0
    python bench/learning_curve.py --method coop --set ctx_init="a photo of a" --set n_ctx=4 \\
        --set batch_size=1 --set warmup_epochs=0 --steps 720
    python bench/learning_curve.py --method cocoop --logit-scale 6 ...   # diagnosis only

One classification run through the harness's own trainer (`peftbench.trainer.fit`: the method's
optimiser and schedule, `--steps` optimiser steps, the schedule stretched over them as
`--set iterations=N` would), evaluated every `--every` steps on a fixed subset of the test split
(the first `--test-per-class` images of each class; 0: the whole split). For each evaluation it
prints top-1, the mean over images of the standard deviation of the cosine scores across classes
(`spread`: how confident the classifier is before the logit scale), and the running mean of the
training loss since the last evaluation. On the embedded world (`synth_*`, classes named
"<colour>_<shape>") it also prints how often the predicted shape and colour are right.

`--calibration` first prints, for the untrained method on the training shots, the cross-entropy
at several logit scales: for the whole problem and, on the embedded world, for the shape among
the true colour's classes and the colour among the true shape's classes. A loss that falls as the
scale falls means the scores are confidently wrong there, and cross-entropy rewards flattening them.

`--logit-scale S` replaces the backbone's logit scale for training and scoring; it changes the
method, so it is a diagnosis knob, never a benchmark setting. Nothing is written to a results store
(the few-shot split goes to a temporary folder).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see peftbench/__init__.py

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from peftbench.config import parse_overrides
from peftbench.errors import UsageError
from peftbench.registry import load_plugins
from peftbench.runner import RunSpec, build_method, resolve
from peftbench.task import DataEnv
from peftbench.trainer import fit, seed_everything


def per_class_subset(test, per_class: int):
    if per_class <= 0:
        return test
    seen: dict[int, int] = {}
    keep = []
    for i, (_, label) in enumerate(test.items):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return Subset(test, keep)


def attributes(classnames: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(colour id, shape id) per class for the embedded world's "<colour>_<shape>" names."""
    parts = [c.split("_", 1) for c in classnames]
    if not all(len(p) == 2 for p in parts):
        return None
    colours = sorted({p[0] for p in parts})
    shapes = sorted({p[1] for p in parts})
    colour_ids = torch.tensor([colours.index(p[0]) for p in parts])
    return colour_ids, torch.tensor([shapes.index(p[1]) for p in parts])


@torch.no_grad()
def score(model, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) cosine scores of the method in eval mode and the (N,) labels; leaves it training."""
    model.eval()
    scores, labels = [], []
    for images, y in DataLoader(dataset, batch_size=64):
        scores.append(model.class_scores(model.encode_image(images), images))
        labels.append(y)
    model.train()
    return torch.cat(scores), torch.cat(labels)


def probe(model, test, attrs) -> dict[str, float]:
    s, y = score(model, test)
    pred = s.argmax(dim=-1)
    out = {"top1": 100 * float((pred == y).float().mean()), "spread": float(s.std(dim=-1).mean())}
    if attrs is not None:
        colour, shape = attrs
        out["shape"] = 100 * float((shape[pred] == shape[y]).float().mean())
        out["colour"] = 100 * float((colour[pred] == colour[y]).float().mean())
    return out


def calibration(model, train, attrs, native: float) -> list[str]:
    """Markdown table: cross-entropy of the untrained method's training-shot scores per logit scale."""
    s, y = score(model, train)
    problems = {"all classes": torch.ones_like(s, dtype=torch.bool)}
    if attrs is not None:
        colour, shape = attrs
        problems["shape, given the colour"] = colour[None, :] == colour[y][:, None]
        problems["colour, given the shape"] = shape[None, :] == shape[y][:, None]
    scales = sorted({2.0, 4.0, 6.0, 8.0, 10.0, 25.0, round(native, 2)})
    lines = ["| problem | top-1 (%) | " + " | ".join(
        f"CE @ {k:g}{' (native)' if k == round(native, 2) else ''}" for k in scales) + " |",
        "|---|---:|" + "---:|" * len(scales)]
    for name, mask in problems.items():
        ce = [float(F.cross_entropy((k * s).masked_fill(~mask, float("-inf")), y)) for k in scales]
        top1 = 100 * float((s.masked_fill(~mask, float("-inf")).argmax(-1) == y).float().mean())
        lines.append(f"| {name} | {top1:.1f} | " + " | ".join(f"{v:.3f}" for v in ce) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True)
    p.add_argument("--dataset", default="synth_sketch")
    p.add_argument("--backbone", default="synth-tiny")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config override")
    p.add_argument("--steps", type=int, default=960, help="optimiser steps (schedule stretched)")
    p.add_argument("--every", type=int, default=240, help="evaluate every N steps")
    p.add_argument("--test-per-class", type=int, default=3, help="test images per class (0: all)")
    p.add_argument("--logit-scale", type=float, default=None, help="diagnosis: replace the logit scale")
    p.add_argument("--calibration", action="store_true", help="first print the loss-vs-logit-scale table")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        print("error: --steps and --every must be >= 1", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    load_plugins()
    splits = tempfile.TemporaryDirectory(prefix="peftbench-curve-")  # the same split a run would draw
    env = DataEnv(device=torch.device("cpu"), progress=False, split_dir=Path(splits.name))
    overrides = parse_overrides(args.set) | {"iterations": args.steps}
    spec = RunSpec(method=args.method, dataset=args.dataset, backbone=args.backbone, shots=args.shots,
                   seed=args.seed, method_overrides=tuple(overrides.items()))
    try:
        run = resolve(spec, env.device)
        seed_everything(args.seed)
        data = run.task.build(run.dataset, args.shots, args.seed, run.backbone, env)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if run.spec.task != "classification":
        print("error: the probe scores classification runs only", file=sys.stderr)
        return 2
    model = build_method(run, data.classnames, data.template)
    if args.logit_scale is not None:
        with torch.no_grad():
            model.backbone.model.logit_scale.fill_(math.log(args.logit_scale))
    test = per_class_subset(data.test, args.test_per_class)
    attrs = attributes(list(data.classnames)) if args.dataset.startswith("synth") else None
    cfg = run.method_config
    scale = args.logit_scale if args.logit_scale is not None else float(run.backbone.logit_scale)
    if args.calibration:
        print(f"Untrained `{args.method}`, cross-entropy on the {len(data.train)} training shots "
              "(train augmentation) at several logit scales:\n")
        print("\n".join(calibration(model, data.train, attrs, scale)) + "\n")

    losses: list[float] = []
    rows = [{"step": 0, "loss": None, **probe(model, test, attrs)}]
    t0 = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if step % args.every == 0 or step == args.steps:
            rows.append({"step": step, "loss": sum(losses) / len(losses), **probe(model, test, attrs)})
            losses.clear()
            print(f"step {step}: {rows[-1]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    fit(model, run.task, data, cfg, env, args.seed, progress=False, on_step=on_step)

    print(f"`{args.method}` on `{args.dataset}`, {args.shots} shots, seed {args.seed}: "
          f"batch {cfg.batch_size}, "
          f"{cfg.optimizer} lr {cfg.lr:g}, warm-up {cfg.warmup_epochs:g} epoch(s), {args.steps} steps, "
          f"logit scale {scale:.2f}{' (replaced)' if args.logit_scale is not None else ''}; "
          f"overrides {dict(parse_overrides(args.set)) or 'none'}; {len(test)} test images.\n")
    cols = ["step", "train loss", "top-1 (%)"] + (["shape (%)", "colour (%)"] if attrs is not None else [])
    cols.append("spread")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    for r in rows:
        cells = [str(r["step"]), "-" if r["loss"] is None else f"{r['loss']:.3f}", f"{r['top1']:.2f}"]
        if attrs is not None:
            cells += [f"{r['shape']:.1f}", f"{r['colour']:.1f}"]
        cells.append(f"{r['spread']:.3f}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
