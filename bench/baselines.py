"""Evidence for the baseline ports (issue 4): every method's few-shot accuracy against zero-shot.

    python bench/baselines.py                                  # every registered method, 16 shots
    python bench/baselines.py --methods lora,mma --seeds 1,2   # a subset, more seeds
    python bench/baselines.py --max-steps 0                    # the official run lengths (slow on CPU)

Each cell is a real run through `peftbench.runner.execute` (records in `--results-dir`, default
a temporary folder), on the embedded world (`synth-tiny` backbone, `synth` classification
dataset: 120 classes in six domains, 1,440 test images) unless `--backbone/--dataset` say
otherwise. Budget knob: `--max-steps N` caps every method's optimiser steps at N (the methods'
own recipes run 20 epochs to 8,000 iterations at 16 shots, too long for a CPU demo); the table
says which runs were capped and what their own length would have been. The Markdown table is
printed and written to docs/baselines.md (unless --no-doc).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see peftbench/__init__.py

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from peftbench.registry import METHODS, load_plugins
from peftbench.results import ResultStore
from peftbench.runner import RunSpec, execute, resolve
from peftbench.task import DataEnv
from peftbench.trainer import plan_steps

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "baselines.md"


def classification_methods() -> list[str]:
    load_plugins()
    return sorted(n for n, c in METHODS.items() if "classification" in c.tasks and n != "zeroshot")


def own_steps(spec: RunSpec, env: DataEnv, n_train: int) -> int:
    """The method's own number of optimiser steps for this cell (resolved config, no cap)."""
    run = resolve(spec, env.device)
    steps_per_epoch = max(1, -(-n_train // max(1, min(run.method_config.batch_size, n_train))))
    return plan_steps(run.method_config, steps_per_epoch)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (default)")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seeds", default="1", help="comma-separated seeds")
    p.add_argument("--backbone", default="synth-tiny")
    p.add_argument("--dataset", default="synth")
    p.add_argument("--data-root", type=Path, default=None, help="for datasets that read from disk")
    p.add_argument("--max-steps", type=int, default=300, help="cap on optimiser steps per run; 0: no cap")
    p.add_argument("--results-dir", type=Path, default=None, help="keep the records here (default: temp)")
    p.add_argument("--no-doc", action="store_true", help="print only, do not write docs/baselines.md")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine, 2 threads ran 7x slower)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    available = classification_methods()
    asked = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = available if args.methods == "all" else asked
    unknown = [m for m in methods if m not in available]
    if unknown:
        print(f"error: unknown or non-classification method(s) {unknown}; choices: {', '.join(available)}",
              file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = args.results_dir or Path(tempfile.mkdtemp(prefix="peftbench-baselines-"))
    store = ResultStore(results)
    env = DataEnv(data_root=args.data_root, split_dir=results / "splits", device=torch.device("cpu"))

    def cell(method: str, seed: int, overrides: tuple = ()) -> dict:
        spec = RunSpec(method=method, dataset=args.dataset, backbone=args.backbone, shots=args.shots,
                       seed=seed, method_overrides=overrides)
        out = execute(spec, store, env, progress=False)
        rec = out.record or {}
        if rec.get("status") != "ok":
            raise SystemExit(f"{method} seed {seed} failed: {rec.get('error', out.status)}")
        return rec

    zs = [cell("zeroshot", s) for s in seeds]
    zs_acc = statistics.mean(r["metrics"]["acc"]["value"] for r in zs)
    n_train = zs[0]["data"]["n_train"]
    rows = []
    for method in methods:
        base = RunSpec(method=method, dataset=args.dataset, backbone=args.backbone, shots=args.shots)
        steps = own_steps(base, env, n_train)
        capped = bool(args.max_steps) and steps > args.max_steps
        overrides = (("iterations", args.max_steps),) if capped else ()
        t0 = time.perf_counter()
        recs = [cell(method, s, overrides) for s in seeds]
        accs = [r["metrics"]["acc"]["value"] for r in recs]
        rows.append({
            "method": method,
            "acc": statistics.mean(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else None,
            "delta": statistics.mean(accs) - zs_acc,
            "trainable": recs[0]["params"]["trainable"],
            "train_s": statistics.mean(r["timing"]["train_s"] for r in recs),
            "steps": recs[0]["train"]["steps"],
            "own_steps": steps,
            "capped": capped,
            "wall_s": time.perf_counter() - t0,
        })
        print(f"{method}: {rows[-1]['acc']:.2f} (zero-shot {zs_acc:.2f}), {rows[-1]['train_s']:.1f} s",
              file=sys.stderr)

    weights = zs[0]["backbone"].get("pretrained")
    lines = [
        f"Backbone `{args.backbone}` (weights: `{weights}`), dataset `{args.dataset}`, {args.shots} shots, "
        f"seeds {','.join(map(str, seeds))}, {zs[0]['data']['n_test']} test images, CPU "
        f"({torch.get_num_threads()} threads). Zero-shot top-1: **{zs_acc:.2f}**.",
        "",
        "| method | top-1 (%) | vs zero-shot | trainable params | train time (s) | steps (own recipe) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| zeroshot | {zs_acc:.2f} | - | 0 | 0 | - |",
    ]
    for r in rows:
        acc = f"{r['acc']:.2f}" + (f" ± {r['sd']:.2f}" if r["sd"] is not None else "")
        steps = f"{r['steps']}" + (f" (capped; {r['own_steps']})" if r["capped"] else f" ({r['own_steps']})")
        lines.append(f"| {r['method']} | {acc} | {r['delta']:+.2f} | {r['trainable']:,} | "
                     f"{r['train_s']:.1f} | {steps} |")
    capped = [r["method"] for r in rows if r["capped"]]
    if capped:
        lines += ["", f"Capped at {args.max_steps} optimiser steps (`--max-steps`; the schedule is "
                      f"stretched to the capped run): {', '.join(capped)}. The figure in brackets is "
                      "the method's own run length at these shots."]
    losers = [r["method"] for r in rows if r["delta"] <= 0]
    if losers:
        lines += ["", f"Not above zero-shot here: {', '.join(losers)}."]
    cmd = "python bench/baselines.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"Command: `{cmd.strip()}`; records in `{results}`."]
    table = "\n".join(lines)
    print(table)
    if not args.no_doc:
        write_doc(table)
    return 0


def write_doc(table: str) -> None:
    """Replace the generated block of docs/baselines.md (between the markers) with `table`."""
    start, end = "<!-- baselines:start -->", "<!-- baselines:end -->"
    text = DOC.read_text() if DOC.is_file() else f"# Baselines\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    DOC.write_text(f"{head}{start}\n{table}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
