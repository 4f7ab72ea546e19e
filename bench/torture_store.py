"""Torture the results store and the sweep's resume: SIGKILL a sweep at random moments, then hammer
the store with concurrent appenders. Prints the figures; exits 1 if any promise is broken.

    .venv/bin/python bench/torture_store.py                  # 10 kill trials, 8 x 100 appends
    .venv/bin/python bench/torture_store.py --trials 3 --appenders 4 --records 20   # quicker

Part 1 (kill -9): a reference sweep runs uninterrupted into its own store. Then the same sweep is
started again and again into a second store and killed with SIGKILL (the whole process group) at a
random moment; after each kill the store is checked: no finished run lost (every ok record seen
before the kill is still there, byte for byte), no corrupt record, no cell with two ok records. A
last resume finishes the grid; its set of ok config hashes must equal the reference's, and every
cell's metrics must equal the reference's (runs cut mid-training resume from their epoch
checkpoint and must land on the same numbers).

Part 2 (concurrency): N processes append M records each to one store at the same moment, into a
few shared cells; all N x M records must be readable, with unique ids and intact payloads.

Everything runs on a generated tiny world (a 2-block open_clip config, 4 coloured-square classes)
through a plugin file, so it needs no data, no weights and a few minutes of CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see peftbench/__init__.py

import argparse
import hashlib
import json
import multiprocessing as mp
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

from peftbench.results import ResultStore

TINY_CONFIG = {  # the size of tests/tiny-test.json: 2 blocks per tower, joint width 32
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
}

PLUGIN = '''
"""Torture plugin: a tiny backbone and a slow-ish trainable method (so kills land mid-training)."""
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftbench.backbone import register_shipped_backbone
from peftbench.config import MethodConfig
from peftbench.method import Method
from peftbench.registry import register_method

torch.set_num_threads(1)  # the same arithmetic in every process: resumed runs compare exactly
register_shipped_backbone("torture-tiny", Path(__file__).parent / "torture-tiny.json", None)


@dataclass(frozen=True)
class TortureConfig(MethodConfig):
    optimizer: str = "adamw"  # bench values: a handful of steps that change the outputs
    lr: float = 0.05
    batch_size: int = 2
    epochs: int | None = 4
    step_sleep_s: float = 0.05  # widens the window in which a kill lands mid-training


@register_method("torture-train")
class TortureTrain(Method):
    """Zero-initialised linear residual on the image embedding; trainable: that E x E map."""

    Config = TortureConfig

    def __init__(self, backbone, classnames, config=None, template="a photo of a {}."):
        super().__init__(backbone, classnames, config, template)
        e = backbone.embed_dim
        self.residual = nn.Linear(e, e, bias=False)
        nn.init.zeros_(self.residual.weight)

    def encode_image(self, images):
        f = self.backbone.encode_image(images)  # (B, E)
        return f + self.residual(f)

    def regularizer(self):
        time.sleep(self.config.step_sleep_s)
        return None
'''

EXPERIMENT = """\
name: torture
data_root: {data}
plugins: [torture_plugin.py]
backbones: [torture-tiny]
methods:
  zeroshot:
  torture-train: [{{}}, {{lr: 0.02}}]
tasks:
  classification: {{datasets: [imagefolder]}}
shots: [1, 2]
seeds: [1, 2, 3, 4, 5]
"""

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20)]


def make_world(root: Path) -> Path:
    """Plugin, backbone config, a 4-class image folder and the experiment file; returns the file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "torture-tiny.json").write_text(json.dumps(TINY_CONFIG))
    (root / "torture_plugin.py").write_text(PLUGIN)
    data = root / "data"
    for ci, name in enumerate(("red", "green", "blue", "yellow")):
        (data / name).mkdir(parents=True, exist_ok=True)
        for i in range(10):
            rng = np.random.default_rng(ci * 100 + i)
            arr = np.full((40, 40, 3), 255, np.uint8)
            x, y = rng.integers(2, 13, 2)
            arr[y : y + 20, x : x + 20] = COLOURS[ci]
            Image.fromarray(arr).save(data / name / f"{name}_{i:03d}.png")
    exp = root / "torture.yaml"
    exp.write_text(EXPERIMENT.format(data=data))
    return exp


def sweep_cmd(exp: Path, store: Path) -> list[str]:
    # Not `-m peftbench.cli`: as __main__ that module's app would miss the subcommands registered on import.
    cli = "from peftbench.cli import main; main()"
    return [sys.executable, "-c", cli, "sweep", str(exp), "--results-dir", str(store)]


def snapshot(store: ResultStore) -> tuple[dict[str, str], int, dict[str, int]]:
    """(record path -> sha256 of its bytes, corrupt records, ok records per cell)."""
    seen: dict[str, str] = {}
    per_cell: dict[str, int] = {}
    recs = list(store.iter_records())
    corrupt = len(getattr(store, "skipped", []))
    for r in recs:
        seen[r["_path"]] = hashlib.sha256(Path(r["_path"]).read_bytes()).hexdigest()
        if r["status"] == "ok":
            per_cell[r["config_hash"]] = per_cell.get(r["config_hash"], 0) + 1
    return seen, corrupt, per_cell


def metrics_by_hash(store: ResultStore) -> dict[str, dict]:
    return {r["config_hash"]: r["metrics"] for r in store.iter_records() if r["status"] == "ok"}


def kill_trials(exp: Path, work: Path, trials: int, rng: random.Random) -> dict:
    ref_dir, dir_ = work / "reference", work / "killed"
    log = open(work / "sweeps.log", "ab")  # noqa: SIM115 - closed at the end
    t0 = time.perf_counter()
    proc = subprocess.Popen(sweep_cmd(exp, ref_dir), stdout=log, stderr=log)
    t_first = None  # start-up (imports, plan) = time until the first record lands
    while proc.poll() is None:
        if t_first is None and any((ref_dir / "runs").glob("*/*/*.json")):
            t_first = time.perf_counter() - t0
        time.sleep(0.05)
    t_ref = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the reference sweep failed (rc {proc.returncode}); see {work / 'sweeps.log'}")
    t_first = t_first or t_ref
    ref = ResultStore(ref_dir)
    ref_ok = metrics_by_hash(ref)
    print(
        f"reference sweep: {len(ref_ok)} ok cells in {t_ref:.1f} s uninterrupted "
        f"(first record after {t_first:.1f} s)",
        flush=True,
    )

    store = ResultStore(dir_)
    lost = corrupt = doubled = mid_training = 0
    for trial in range(1, trials + 1):
        before, _, _ = snapshot(store)
        proc = subprocess.Popen(sweep_cmd(exp, dir_), stdout=log, stderr=log, start_new_session=True)
        # A random moment from late start-up to about half of the work left: each trial gains a few
        # cells, so that every trial still has work to be cut.
        left = 1 - len(snapshot(store)[2]) / len(ref_ok)
        delay = rng.uniform(0.7 * t_first, t_first + 0.5 * left * (t_ref - t_first))
        what = "finished before"
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            what = "SIGKILL at"
        after, bad, per_cell = snapshot(store)
        gone = [p for p, h in before.items() if after.get(p) != h]
        ckpts = list((dir_ / "checkpoints").glob("*.pt")) if (dir_ / "checkpoints").is_dir() else []
        mid_training += bool(ckpts)
        lost += len(gone)
        corrupt += bad
        doubled += sum(1 for n in per_cell.values() if n > 1)
        print(
            f"trial {trial:2d}: {what} {delay:5.1f} s; ok cells {len(per_cell):2d}/"
            f"{len(ref_ok)}; lost {len(gone)}, corrupt {bad}, cells with 2 ok records "
            f"{sum(1 for n in per_cell.values() if n > 1)}; epoch checkpoints left {len(ckpts)}",
            flush=True,
        )

    subprocess.run(sweep_cmd(exp, dir_), stdout=log, stderr=log, check=False)  # the final resume
    log.close()
    final, bad, per_cell = snapshot(store)
    got = metrics_by_hash(store)
    resumed = sum(1 for r in store.iter_records() if (r.get("train") or {}).get("resumed_from_step", 0) > 0)
    return {
        "trials": trials,
        "finished_runs_lost": lost,
        "corrupt_records": corrupt + bad,
        "cells_with_two_ok_records": doubled + sum(1 for n in per_cell.values() if n > 1),
        "kills_mid_training": mid_training,
        "runs_resumed_from_epoch_checkpoint": resumed,
        "ok_hashes_equal_reference": set(got) == set(ref_ok),
        "metrics_differing_from_reference": sum(1 for h in ref_ok if got.get(h) != ref_ok[h]),
        "reference_seconds": round(t_ref, 1),
    }


def _appender(root: str, writer: int, n: int, start, cells: int) -> None:
    store = ResultStore(root)
    start.wait()
    for i in range(n):
        payload = f"{writer}:{i}:" + "x" * (i % 97)
        h = hashlib.sha256(f"cell{(writer + i) % cells}".encode()).hexdigest()
        store.append(
            {
                "config_hash": h,
                "status": "ok",
                "writer": writer,
                "i": i,
                "payload": payload,
                "check": hashlib.sha256(payload.encode()).hexdigest(),
            }
        )


def concurrent_appends(work: Path, appenders: int, records: int) -> dict:
    root = work / "concurrent"
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_appender, args=(str(root), w, records, start, 10)) for w in range(appenders)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every writer is waiting on the event
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    seconds = time.perf_counter() - t0
    store = ResultStore(root)
    recs = list(store.iter_records())
    intact = sum(1 for r in recs if hashlib.sha256(r["payload"].encode()).hexdigest() == r["check"])
    pairs = {(r["writer"], r["i"]) for r in recs}
    return {
        "appenders": appenders,
        "records_each": records,
        "records_read": len(recs),
        "records_intact": intact,
        "unreadable": len(store.skipped),
        "unique_record_ids": len({r["record_id"] for r in recs}),
        "all_writes_present": pairs == {(w, i) for w in range(appenders) for i in range(records)},
        "writer_exit_codes": sorted({p.exitcode for p in procs}),
        "seconds": round(seconds, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--appenders", type=int, default=8)
    ap.add_argument("--records", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="peftbench-torture-"))
    exp = make_world(work)
    t0 = time.perf_counter()
    kills = kill_trials(exp, work, args.trials, random.Random(args.seed))
    conc = concurrent_appends(work, args.appenders, args.records)
    print(
        textwrap.dedent(f"""
        == kill -9 at random moments, resuming each time ({kills["trials"]} trials) ==
        finished runs lost:                     {kills["finished_runs_lost"]}
        corrupt records:                        {kills["corrupt_records"]}
        cells with two ok records:              {kills["cells_with_two_ok_records"]}
        final ok hashes == uninterrupted run's: {kills["ok_hashes_equal_reference"]}
        metrics differing from uninterrupted:   {kills["metrics_differing_from_reference"]}
        kills that left an epoch checkpoint:    {kills["kills_mid_training"]}
        runs resumed from an epoch checkpoint:  {kills["runs_resumed_from_epoch_checkpoint"]}
        == {conc["appenders"]} processes x {conc["records_each"]} concurrent appends ==
        records read / intact / unique ids:     {conc["records_read"]} / {conc["records_intact"]} / \
{conc["unique_record_ids"]}
        unreadable records:                     {conc["unreadable"]}
        every (writer, i) present:              {conc["all_writes_present"]}
        total wall time:                        {time.perf_counter() - t0:.0f} s
    """)
    )
    expected = conc["appenders"] * conc["records_each"]
    ok = (
        kills["finished_runs_lost"] == 0
        and kills["corrupt_records"] == 0
        and kills["cells_with_two_ok_records"] == 0
        and kills["ok_hashes_equal_reference"]
        and kills["metrics_differing_from_reference"] == 0
        and conc["records_read"] == conc["records_intact"] == conc["unique_record_ids"] == expected
        and conc["unreadable"] == 0
        and conc["all_writes_present"]
        and conc["writer_exit_codes"] == [0]
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
