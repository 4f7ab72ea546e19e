"""The results store's promises: atomic records, latest wins, skip on rerun, concurrent writers
from several OS processes, a writer SIGKILLed mid-write, and the cell lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY

from peftbench.method import Method
from peftbench.registry import METHODS, register_method
from peftbench.results import CellBusy, ResultStore
from peftbench.runner import RunSpec, execute
from peftbench.task import DataEnv

WRITER = textwrap.dedent(
    """
    import sys, torch
    from peftbench.results import ResultStore
    root, who, n, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = ResultStore(root)
    for i in range(n):
        state = {"w": torch.full((big,), float(i))} if big else None
        store.append({"config_hash": f"{who}{i:04d}".ljust(64, "0"), "status": "ok", "payload": "x" * 20000,
                      "who": who, "i": i}, state)
    """
)


def spawn_writer(root: Path, who: str, n: int, big: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), who, str(n), str(big)])


def test_append_is_atomic_and_latest_wins(tmp_path):
    store = ResultStore(tmp_path)
    h = "ab" * 32
    store.append({"config_hash": h, "status": "failed", "error": "boom"})
    store.append({"config_hash": h, "status": "ok", "metrics": {}}, {"w": torch.ones(3)})
    assert store.latest(h)["status"] == "ok"
    assert len(store.cell_records(h)) == 2
    assert torch.equal(store.load_state(store.latest(h))["w"], torch.ones(3))
    assert not list(tmp_path.rglob(".tmp-*"))


def test_four_processes_write_concurrently_without_loss(tmp_path):
    procs = [spawn_writer(tmp_path, f"p{k}", 25) for k in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    recs = ResultStore(tmp_path).records()
    assert len(recs) == 100
    assert {(r["who"], r["i"]) for r in recs} == {(f"p{k}", i) for k in range(4) for i in range(25)}


def test_sigkilled_writer_leaves_no_partial_record(tmp_path):
    # A writer appending records with 4 MB states is killed at some moment mid-stream.
    proc = spawn_writer(tmp_path, "k", 400, big=1_000_000)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(tmp_path.rglob("*.json"))) < 3:
        time.sleep(0.05)
    time.sleep(0.13)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = ResultStore(tmp_path)
    recs = list(store.iter_records())
    assert store.skipped == [], store.skipped  # every record present parses
    assert 3 <= len(recs) < 400
    for r in recs:  # and every state a record names is complete
        assert store.load_state(r)["w"].numel() == 1_000_000
    # No visible .json is partial: leftover temporaries are hidden and ignored.
    for path in tmp_path.rglob("*.json"):
        json.loads(path.read_text())


def test_cell_lock_is_exclusive_across_processes(tmp_path):
    store = ResultStore(tmp_path)
    h = "cd" * 32
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import time
            from peftbench.results import ResultStore
            with ResultStore({str(tmp_path)!r}).lock({h!r}):
                print("locked", flush=True)
                time.sleep(30)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert store.is_running(h)
        with pytest.raises(CellBusy), store.lock(h):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert not store.is_running(h)  # the OS released the dead holder's lock
    with store.lock(h):
        pass


def test_rerun_skips_ok_cells_and_failed_ones_until_asked(tmp_path, folder_dataset):
    env = DataEnv(data_root=folder_dataset, split_dir=tmp_path / "splits")
    store = ResultStore(tmp_path / "res")
    spec = RunSpec(method="zeroshot", dataset="imagefolder", backbone=TINY, pretrained=None, shots=2)
    first = execute(spec, store, env, progress=False)
    assert first.status == "ok"
    again = execute(spec, store, env, progress=False)
    assert again.status == "skipped-ok" and len(store.cell_records(first.config_hash)) == 1
    forced = execute(spec, store, env, progress=False, force=True)
    assert forced.status == "ok" and len(store.cell_records(first.config_hash)) == 2


class Probe(Method):
    """A one-parameter method whose regulariser can be poisoned with NaN (test-only)."""

    poison = True
    after_fit_calls = 0

    def __init__(self, backbone, classnames, config=None, template="a photo of a {}."):
        super().__init__(backbone, classnames, config, template)
        self.bias = torch.nn.Parameter(torch.zeros(backbone.embed_dim))

    def encode_image(self, images):
        return super().encode_image(images) + self.bias

    def regularizer(self):
        return torch.tensor(float("nan")) if Probe.poison else None

    def after_fit(self, train_data):
        Probe.after_fit_calls += 1


@pytest.fixture
def probe_method():
    register_method("_probe")(Probe)
    Probe.poison = True
    yield "_probe"
    METHODS.pop("_probe")


def test_failed_cells_are_recorded_skipped_and_retried(tmp_path, folder_dataset, probe_method):
    env = DataEnv(data_root=folder_dataset, split_dir=tmp_path / "splits")
    store = ResultStore(tmp_path / "res")
    spec = RunSpec(
        method=probe_method,
        dataset="imagefolder",
        backbone=TINY,
        pretrained=None,
        shots=2,
        method_overrides=(("epochs", 1), ("batch_size", 4)),
    )
    failed = execute(spec, store, env, progress=False)
    assert failed.status == "failed"
    assert "NonFiniteLoss" in failed.record["error"] and "Traceback" in failed.record["traceback"]
    assert execute(spec, store, env, progress=False).status == "skipped-failed"
    Probe.poison = False
    retried = execute(spec, store, env, progress=False, retry_failed=True)
    assert retried.status == "ok"
    assert [r["status"] for r in store.cell_records(failed.config_hash)] == ["failed", "ok"]
    assert store.latest(failed.config_hash)["status"] == "ok"
