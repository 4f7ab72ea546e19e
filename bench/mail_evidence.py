"""Evidence for MAIL and MAIL++ on the embedded world: both against zero-shot CLIP on both tasks, and
the MAIL++ bridge ablation (none / t2i / meta / meta+t2i), as Markdown, written into docs/mail.md.

    .venv/bin/python bench/mail_evidence.py                          # defaults below
    .venv/bin/python bench/mail_evidence.py --cls-steps 0 --ucdr-steps 0   # full recipes (slow on CPU)

Every cell is an ordinary run (`peftbench.runner.execute`) in its own results store
(default results/mail_evidence), so the script resumes: finished cells are never run twice, and
`peftbench show results/mail_evidence` lists the records. The tables are a pure function of them.
Merged models are evaluated (the runner evaluates `deployed()` for mergeable methods).

CPU budget: the official recipes (classification 10 epochs at batch 4) do not fit a shared 2-core
machine, so by default the classification runs are capped at --cls-steps optimiser steps with
--cls-lr, and the UCDR runs use the task's own run length for the embedded world unless --ucdr-steps
is given. Every setting is printed with the tables.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see peftbench/__init__.py

import argparse
import re
import statistics
import sys
from pathlib import Path

import torch

from peftbench.registry import get_task, load_plugins
from peftbench.results import ResultStore
from peftbench.runner import RunSpec, execute
from peftbench.task import DataEnv

DOC = Path(__file__).resolve().parents[1] / "docs" / "mail.md"
START, END = "<!-- mail_evidence:start -->", "<!-- mail_evidence:end -->"
MAIN = [("zeroshot", ()), ("mail", ()), ("mail_pp", ())]
ABLATION = [("mail_pp", (("bridge", b),)) for b in ("none", "t2i", "meta", "meta+t2i")]


def label(method: str, over: tuple) -> str:
    name = {"zeroshot": "zero-shot CLIP", "mail": "MAIL", "mail_pp": "MAIL++"}[method]
    extra = [f"{k}={v}" for k, v in over if k not in ("iterations", "lr")]
    return name + (f" ({', '.join(extra)})" if extra else "")


USED: dict[str, str] = {}  # task -> the metric tabulated


def pick_metric(metrics: dict, primary: str) -> str:
    """The task's primary metric, or (the embedded world caps K at its gallery size, e.g. map@50
    instead of map@200) the first metric of the same family without a setting suffix."""
    if primary in metrics:
        return primary
    family = primary.split("@")[0] + "@"
    return next((m for m in metrics if m.startswith(family) and "_" not in m), next(iter(metrics)))


def run_cells(args, env: DataEnv, store: ResultStore) -> dict:
    """(task, method, overrides) -> primary-metric values over seeds. The main comparison runs first
    on both tasks, then the ablation; with --render-only nothing runs and finished cells are read."""
    from peftbench.runner import resolve

    out: dict = {}
    tasks = (("classification", args.cls_dataset, args.cls_shots), ("ucdr", "synth", args.ucdr_shots))
    for group in (MAIN, ABLATION):
        for task, dataset, shots in tasks:
            for method, over in group:
                method_over = dict(over)
                task_over = {}
                if method != "zeroshot":
                    if task == "classification" and args.cls_steps:
                        method_over.update(iterations=args.cls_steps, lr=args.cls_lr)
                    if task == "ucdr" and args.ucdr_steps:
                        task_over["steps"] = args.ucdr_steps
                for seed in args.seeds:
                    spec = RunSpec(
                        method=method,
                        task=task,
                        dataset=dataset,
                        backbone=args.backbone,
                        shots=shots,
                        seed=seed,
                        method_overrides=tuple(sorted(method_over.items())),
                        task_overrides=tuple(sorted(task_over.items())),
                    )
                    if args.render_only:
                        rec = store.latest(resolve(spec, env.device).config_hash) or {}
                        status = rec.get("status", "not run")
                    else:
                        outcome = execute(spec, store, env, progress=False)
                        rec, status = outcome.record or {}, outcome.status
                    if rec.get("status") != "ok":
                        print(f"  {task} {label(method, over)} seed {seed}: {status} {rec.get('error', '')}")
                        continue
                    metric = pick_metric(rec["metrics"], get_task(task).primary_metric)
                    USED[task] = metric
                    value = rec["metrics"][metric]["value"]
                    out.setdefault((task, method, over), []).append(value)
                    print(
                        f"  {task:14s} {label(method, over):28s} seed {seed}: {metric} {value:.4f} "
                        f"(merged: {rec.get('merged')}, trainable {rec['params']['trainable']:,}, "
                        f"steps {rec.get('train', {}).get('steps')})",
                        flush=True,
                    )
    return out


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    digits = 4 if abs(mean) <= 1 else 2  # mAP in [0, 1]; accuracy in percent
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def tables(results: dict, args) -> str:
    cls_metric = USED.get("classification", get_task("classification").primary_metric)
    ucdr_metric = USED.get("ucdr", get_task("ucdr").primary_metric)
    lines = [
        f"Embedded world (`{args.backbone}`), seeds {', '.join(map(str, args.seeds))}; classification: "
        f"`{args.cls_dataset}`, {args.cls_shots} shots, "
        + (
            f"{args.cls_steps} steps at lr {args.cls_lr:g} (capped recipe)"
            if args.cls_steps
            else "full recipe"
        )
        + f"; UCDR: `synth`, {args.ucdr_shots} shots, "
        + (f"{args.ucdr_steps} steps" if args.ucdr_steps else "the task's run length")
        + ". Mean (± sd over seeds) of each task's primary metric; merged models evaluated.",
        "",
        f"| method | classification {cls_metric} | UCDR {ucdr_metric} |",
        "|---|---|---|",
    ]

    def row(method, over):
        c = results.get(("classification", method, over), [])
        u = results.get(("ucdr", method, over), [])
        return f"| {label(method, over)} | {fmt(c)} | {fmt(u)} |"

    lines += [row(m, o) for m, o in MAIN]
    lines += [
        "",
        "MAIL++ bridge ablation (`--set bridge=...`; t2i has MAIL's structure):",
        "",
        f"| bridge | classification {cls_metric} | UCDR {ucdr_metric} |",
        "|---|---|---|",
    ]
    lines += [row(m, o).replace(label(m, o), dict(o)["bridge"]) for m, o in ABLATION]
    runs = " ".join(a for a in args.argv if a != "--render-only")
    lines += [
        "",
        f"Command: `.venv/bin/python bench/mail_evidence.py {runs}`".replace(" `", "`").rstrip()
        + " (resumable; `--render-only` tabulates finished cells; `-` = not run).",
    ]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    if not DOC.is_file():
        print(f"{DOC} not found: tables printed only")
        return
    doc = DOC.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in doc and END in doc:
        doc = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc)
    print(f"wrote the tables into {DOC}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="synth-tiny")
    ap.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[1])
    ap.add_argument("--cls-dataset", default="synth_sketch",
                    help="classification dataset (default: a domain held out of pretraining, where "
                    "few-shot adaptation has room; in-domain synth is near what 4 shots can teach)")
    ap.add_argument("--cls-shots", type=int, default=4)
    ap.add_argument("--ucdr-shots", type=int, default=2)  # MAIL's main FS-UCDR setting
    ap.add_argument("--cls-steps", type=int, default=40, help="0: the full classification recipe")
    ap.add_argument("--cls-lr", type=float, default=2e-4, help="lr of the capped classification runs")
    ap.add_argument("--ucdr-steps", type=int, default=40, help="0: the task's run length")
    ap.add_argument("--results-dir", type=Path, default=Path("results/mail_evidence"))
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--no-doc", action="store_true", help="print only; do not rewrite docs/mail.md")
    ap.add_argument("--render-only", action="store_true", help="run nothing; tabulate the finished cells")
    args = ap.parse_args(argv)
    args.argv = argv
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    load_plugins()
    env = DataEnv(data_root=args.data_root, split_dir=args.results_dir / "splits")
    results = run_cells(args, env, ResultStore(args.results_dir))
    text = tables(results, args)
    print("\n" + text)
    if not args.no_doc:
        write_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
