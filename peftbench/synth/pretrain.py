"""Pretrain the shipped tiny CLIP ("synth-tiny") contrastively on the embedded world.

    python -m peftbench.synth.pretrain                 # the shipped run (see MANIFEST.json)
    python -m peftbench.synth.pretrain --steps 20 --out-dir /tmp/pilot   # a quick pilot

Data: the pretraining classes and domains only (generator.PRETRAIN_CLASSES x PRETRAIN_DOMAINS;
sketch, quickdraw and 20 classes are held out), images with indices >= PRETRAIN_INDEX_OFFSET (never
used by an evaluation dataset), each paired with one caption drawn from three templates ("a
painting of a red star", "a picture of a red star.", "a red star.").

Loss: CLIP's symmetric InfoNCE (Radford et al., 2021) with a learnable temperature, where every
caption of the same class counts as a positive (a batch holds many images of one class, and
treating them as negatives of each other would punish the right answer): the target of each row
is uniform over its positives. Everything is seeded and runs on the CPU.
Trainable: the whole open_clip model (this is pretraining, not PEFT).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from peftbench.synth import generator as G

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "synth-tiny.json"
WEIGHTS = HERE / "synth-tiny.safetensors"
MANIFEST = HERE / "MANIFEST.json"
TEMPLATE = "a picture of a {}."  # the template of every synth dataset (also a pretraining caption)
CAPTION_TEMPLATES = ("{article} {noun} of a {name}", "a picture of a {name}.", "a {name}.")
MEAN = np.array(open_clip.OPENAI_DATASET_MEAN, np.float32)
STD = np.array(open_clip.OPENAI_DATASET_STD, np.float32)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) CLIP-normalised float (what eval_transform gives)."""
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def build_pool(per_pair: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3), class ids (N,), domain ids (N,) of the pretraining pool."""
    imgs, cls, dom = [], [], []
    for c in G.PRETRAIN_CLASSES:
        for d in G.PRETRAIN_DOMAINS:
            for i in range(per_pair):
                imgs.append(G.render_array(c, d, G.PRETRAIN_INDEX_OFFSET + i))
                cls.append(c)
                dom.append(G.DOMAINS.index(d))
    return np.stack(imgs), np.array(cls), np.array(dom)


def caption_table() -> tuple[list[str], np.ndarray, dict[tuple[int, int, int], int]]:
    """Every pretraining caption, its class, and (class, domain, template) -> caption index."""
    texts, cls, index = [], [], {}
    for c in G.PRETRAIN_CLASSES:
        for d in G.PRETRAIN_DOMAINS:
            for t, tpl in enumerate(CAPTION_TEMPLATES):
                text = G.caption(c, d, tpl)
                if text not in texts:
                    texts.append(text)
                    cls.append(c)
                index[(c, G.DOMAINS.index(d), t)] = texts.index(text)
    return texts, np.array(cls), index


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, img_cls: torch.Tensor, txt_cls: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with every same-class pair a positive. img (B, E), txt (T, E), normalised."""
    logits = scale * img @ txt.t()  # (B, T)
    pos = (img_cls[:, None] == txt_cls[None, :]).float()  # (B, T)
    i2t = -(F.log_softmax(logits, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    t2i = -(F.log_softmax(logits.t(), 1) * pos.t() / pos.t().sum(1, keepdim=True)).sum(1).mean()
    return (i2t + t2i) / 2


@torch.no_grad()
def zeroshot_table(model, tokenizer, per_class: int = 10, first_index: int = 0) -> dict[str, dict]:
    """Top-1 zero-shot accuracy (%) per domain over all 120 classes with TEMPLATE, on images with
    indices first_index..first_index+per_class-1, split by pretraining / held-out classes."""
    model.eval()
    texts = [TEMPLATE.format(n.replace("_", " ")) for n in G.CLASSNAMES]
    tf = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)  # (C, E)
    table = {}
    seen = torch.tensor([c in G.PRETRAIN_CLASSES for c in range(len(G.CLASSNAMES))])
    for d in G.DOMAINS:
        arrays, labels = [], []
        for c in range(len(G.CLASSNAMES)):
            for i in range(first_index, first_index + per_class):
                arrays.append(G.render_array(c, d, i))
                labels.append(c)
        labels_t = torch.tensor(labels)
        feats = F.normalize(model.encode_image(to_tensor(np.stack(arrays))), dim=-1)  # (N, E)
        pred = (feats @ tf.t()).argmax(1)
        ok = pred == labels_t
        in_seen = seen[labels_t]
        table[d] = {
            "all": round(100.0 * ok.float().mean().item(), 2),
            "seen_classes": round(100.0 * ok[in_seen].float().mean().item(), 2),
            "heldout_classes": round(100.0 * ok[~in_seen].float().mean().item(), 2),
            "in_pretraining": d in G.PRETRAIN_DOMAINS,
        }
    return table


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def print_table(table: dict[str, dict]) -> None:
    for d, row in table.items():
        print(f"{d:10s} all {row['all']:5.1f}  seen classes {row['seen_classes']:5.1f}  "
              f"held-out classes {row['heldout_classes']:5.1f}  "
              f"{'pretraining' if row['in_pretraining'] else 'HELD OUT'}")


def update_table(out_dir: Path, argv: list[str] | None) -> None:
    """Recompute the zero-shot table of the weights in `out_dir` with the current generator.

    For a generator change that touches only the held-out domains (which pretraining never sees),
    the weights stay valid; the manifest records the new version and this command.
    """
    from peftbench.backbone import load_backbone

    path = out_dir / MANIFEST.name
    manifest = json.loads(path.read_text())
    weights = out_dir / manifest["weights"]
    if sha256_file(weights) != manifest["sha256"]:
        raise SystemExit(f"{weights} does not match {path} (sha256): retrain instead")
    bb = load_backbone(str(CONFIG), str(weights))
    table = zeroshot_table(bb.model, bb.tokenizer)
    print_table(table)
    manifest["zeroshot"]["top1_by_domain"] = table
    manifest["zeroshot"]["generator_version"] = G.GENERATOR_VERSION
    manifest["zeroshot"]["command"] = " ".join(
        ["python -m peftbench.synth.pretrain", *(sys.argv[1:] if argv is None else argv)]
    )
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"updated {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)  # AdamW; warm-up then cosine
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--per-pair", type=int, default=60, help="pool images per (class, domain)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=HERE, help="where weights and MANIFEST.json go")
    p.add_argument("--table-only", action="store_true",
                   help="recompute the manifest's zero-shot table for the existing weights (no training)")
    args = p.parse_args(argv)
    if args.table_only:
        update_table(args.out_dir, argv)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()

    open_clip.add_model_config(CONFIG)
    model = open_clip.create_model(CONFIG.stem)
    tokenizer = open_clip.get_tokenizer(CONFIG.stem)
    n_params = sum(p.numel() for p in model.parameters())

    images, img_cls, img_dom = build_pool(args.per_pair)
    texts, txt_cls, cap_index = caption_table()
    tokens = tokenizer(texts)  # (T, 32)
    t_data = time.perf_counter() - t_start
    print(f"pool {len(images)} images, {len(texts)} captions, {n_params:,} parameters, data {t_data:.1f}s",
          flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = rng.choice(len(images), args.batch_size, replace=False)
        tpl = rng.integers(0, len(CAPTION_TEMPLATES), args.batch_size)
        # One caption per class present (from a random image of it and a random template): every
        # image of the class is its positive, and the text tower runs ~100 captions, not 256.
        caps = {}
        for i, t in zip(idx, tpl, strict=True):
            caps.setdefault(int(img_cls[i]), cap_index[(int(img_cls[i]), int(img_dom[i]), int(t))])
        uniq = np.array(list(caps.values()))
        x = to_tensor(images[idx])  # (B, 3, 32, 32)
        img = F.normalize(model.encode_image(x), dim=-1)  # (B, E)
        txt = F.normalize(model.encode_text(tokens[torch.from_numpy(uniq)]), dim=-1)  # (U, E)
        scale = model.logit_scale.exp().clamp(max=100)
        img_c, txt_c = torch.from_numpy(img_cls[idx]), torch.from_numpy(txt_cls[uniq])
        loss = multi_positive_loss(img, txt, img_c, txt_c, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            el = time.perf_counter() - t0
            print(f"step {step:4d}  loss {loss.item():.4f}  scale {scale.item():.1f}  {el:.0f}s", flush=True)
    train_s = time.perf_counter() - t0

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / WEIGHTS.name
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(weights))

    # Evaluate what users load: the fp16 weights through peftbench's own loader.
    from peftbench.backbone import load_backbone

    bb = load_backbone(str(CONFIG), str(weights))
    table = zeroshot_table(bb.model, bb.tokenizer)
    print_table(table)
    manifest = {
        "name": "synth-tiny",
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "bytes": weights.stat().st_size,
        "dtype": "float16",
        "config": CONFIG.name,
        "parameters": n_params,
        "command": " ".join(
            ["python -m peftbench.synth.pretrain", *(sys.argv[1:] if argv is None else argv)]
        ),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "pool_per_class_domain": args.per_pair,
        "threads": args.threads,
        "generator_version": G.GENERATOR_VERSION,
        "pretrain_domains": list(G.PRETRAIN_DOMAINS),
        "heldout_domains": list(G.HELDOUT_DOMAINS),
        "heldout_classes": [G.CLASSNAMES[c] for c in G.HELDOUT_CLASSES],
        "caption_templates": list(CAPTION_TEMPLATES),
        "seconds": {
            "data": round(t_data, 1),
            "train": round(train_s, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "zeroshot": {
            "template": TEMPLATE,
            "classes": len(G.CLASSNAMES),
            "chance": round(100.0 / len(G.CLASSNAMES), 2),
            "images_per_class": 10,
            "image_indices": "0..9 of each (class, domain)",
            "top1_by_domain": table,
        },
    }
    (args.out_dir / MANIFEST.name).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB) and {args.out_dir / MANIFEST.name}")


if __name__ == "__main__":
    main()
