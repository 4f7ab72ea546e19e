"""Sweeps: experiment files, the plan, executors (in-process and submitit's local executor),
simulated preemption with resume from an epoch checkpoint, --retry-failed, status, and errors.

Worker processes do not see conftest, so every experiment here loads a small plugin file (written
by `plugin_file`) that registers the tiny-test backbone and a tiny trainable test method.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from peftbench.cli import app
from peftbench.registry import METHODS
from peftbench.results import ResultStore
from peftbench.sweep import load_experiment, plan

TINY_JSON = Path(__file__).parent / "tiny-test.json"

PLUGIN = '''
"""Test plugin: the tiny-test backbone and a tiny trainable method (for sweep worker processes)."""
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftbench.backbone import register_shipped_backbone
from peftbench.config import MethodConfig
from peftbench.method import Method
from peftbench.registry import register_method

torch.set_num_threads(1)  # the same arithmetic in every process, so results compare exactly
register_shipped_backbone("tiny-test", Path(TINY_JSON_PATH), None)


@dataclass(frozen=True)
class TinyTrainConfig(MethodConfig):
    optimizer: str = "adamw"  # test values: a few fast steps that change the outputs
    lr: float = 0.05
    batch_size: int = 4
    epochs: int | None = 3


@register_method("tiny-train")
class TinyTrain(Method):
    """Zero-initialised linear residual on the image embedding; trainable: that E x E map."""

    Config = TinyTrainConfig

    def __init__(self, backbone, classnames, config=None, template="a photo of a {}."):
        super().__init__(backbone, classnames, config, template)
        e = backbone.embed_dim
        self.residual = nn.Linear(e, e, bias=False)
        nn.init.zeros_(self.residual.weight)
        self.calls = 0

    def encode_image(self, images):
        f = self.backbone.encode_image(images)  # (B, E)
        return f + self.residual(f)

    def prepare(self, train_data):
        if os.environ.get("PEFTBENCH_TEST_FAIL") == "1":
            raise RuntimeError("injected failure for the test")

    def regularizer(self):
        # Simulated preemption: SIGUSR2 (what SLURM sends before preempting) at the N-th step, once.
        self.calls += 1
        at = os.environ.get("PEFTBENCH_TEST_PREEMPT_AT")
        marker = os.environ.get("PEFTBENCH_TEST_PREEMPT_MARKER")
        if at and marker and self.calls == int(at) and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGUSR2)
        return None
'''.replace("TINY_JSON_PATH", repr(str(TINY_JSON)))

runner = CliRunner()


@pytest.fixture
def plugin_file(tmp_path) -> Path:
    path = tmp_path / "sweep_test_plugin.py"
    path.write_text(PLUGIN)
    yield path
    # Leave the registry as other test files expect it (the plugin registers "tiny-train" here too).
    METHODS.pop("tiny-train", None)
    sys.modules.pop("peftbench_plugin_sweep_test_plugin", None)


def write_exp(tmp_path: Path, folder: Path, body: str, name: str = "exp.yaml") -> Path:
    head = f"""\
        name: t
        results_dir: {tmp_path / "results"}
        data_root: {folder}
        plugins: [sweep_test_plugin.py]
        backbones: [tiny-test]
    """
    path = tmp_path / name
    path.write_text(textwrap.dedent(head) + textwrap.dedent(body))
    return path


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok_records(store: ResultStore) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in store.records():
        if r["status"] == "ok":
            out.setdefault(r["config_hash"], []).append(r)
    return out


GRID = """\
    methods:
      zeroshot:
      tiny-train: {epochs: 1}
    tasks:
      classification: {datasets: [imagefolder]}
    shots: [2]
    seeds: [1, 2]
"""


def test_expand_dedupes_and_dry_run_plans(tmp_path, folder_dataset, plugin_file):
    exp = write_exp(
        tmp_path,
        folder_dataset,
        """\
        methods:
          zeroshot:
          tiny-train: [{}, {epochs: 3}, {epochs: 1}]   # {} and epochs 3 resolve to the same cell
        tasks:
          classification:
            datasets: [imagefolder]
        shots: [1, 2]
        seeds: [1, 1, 2]
    """,
    )
    e = load_experiment(exp)
    assert len(e.specs) == (1 + 3) * 2 * 2  # seeds deduplicated as written
    cells = plan(e, ResultStore(tmp_path / "results"))
    assert len(cells) == (1 + 2) * 2 * 2  # {} and {epochs: 3} share a config hash
    assert len({c.config_hash for c in cells}) == len(cells)
    assert {c.state for c in cells} == {"pending"}
    res = cli("sweep", exp, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "12 cell(s): 0 done" in res.output and "will run 12" in res.output
    assert "estimate: unknown" in res.output
    assert not (tmp_path / "results" / "runs").exists()  # a dry run writes nothing


def test_inprocess_sweep_limit_retry_failed_and_status(tmp_path, folder_dataset, plugin_file, monkeypatch):
    exp = write_exp(tmp_path, folder_dataset, GRID)
    store = ResultStore(tmp_path / "results")
    res = cli("sweep", exp, "--limit", "1")
    assert res.exit_code == 0, res.output
    assert len(store.records()) == 1
    res = cli("sweep", exp, "--dry-run")  # the finished zeroshot cell times the other zeroshot cell
    assert "will run 3" in res.output and "estimate: ~" in res.output and "unknown for 2" in res.output

    monkeypatch.setenv("PEFTBENCH_TEST_FAIL", "1")
    res = cli("sweep", exp)
    assert res.exit_code == 1  # failures are reported, the sweep still ran every cell
    recs = store.records()
    assert len(recs) == 4
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["spec"]["method"] == "tiny-train" for r in failed)
    assert all("injected failure" in r["error"] and "Traceback" in r["traceback"] for r in failed)
    assert all(r["job"]["executor"] == "inprocess" for r in recs)

    res = cli("status", exp)
    assert res.exit_code == 0, res.output
    assert "injected failure" in res.output
    status = json.loads(cli("status", exp, "--json").output)
    assert status["counts"] == {"done": 2, "running": 0, "failed": 2, "pending": 0, "unresolved": 0}

    res = cli("sweep", exp)  # without --retry-failed: nothing to rerun
    assert "will run 0" in res.output and len(store.records()) == 4

    monkeypatch.delenv("PEFTBENCH_TEST_FAIL")
    res = cli("sweep", exp, "--retry-failed", "--dry-run")
    assert "will run 2" in res.output
    res = cli("sweep", exp, "--retry-failed")
    assert res.exit_code == 0, res.output
    oks = ok_records(store)
    assert len(oks) == 4 and all(len(v) == 1 for v in oks.values())
    assert len(store.records()) == 6  # only the two failures ran again
    status = json.loads(cli("status", exp, "--json").output)
    assert status["counts"]["done"] == 4


def test_status_shows_a_running_cell(tmp_path, folder_dataset, plugin_file):
    exp = write_exp(tmp_path, folder_dataset, GRID)
    store = ResultStore(tmp_path / "results")
    cells = plan(load_experiment(exp), store)
    with store.lock(cells[0].config_hash):  # what a live worker holds while it runs the cell
        status = json.loads(cli("status", exp, "--json").output)
        assert status["counts"]["running"] == 1 and status["counts"]["pending"] == 3
        res = cli("sweep", exp, "--dry-run")
        assert "1 running" in res.output and "will run 3" in res.output


def test_submitit_local_workers_preemption_resumes_like_uninterrupted(
    tmp_path, folder_dataset, plugin_file, monkeypatch
):
    """Two submitit worker processes; one is 'preempted' (SIGUSR2) mid-training in epoch 2: submitit
    calls SweepJob.checkpoint, requeues, and the cut run resumes from its epoch-1 checkpoint. The
    records must equal an uninterrupted in-process run's, metric for metric and tensor for tensor."""
    body = """\
        methods:
          tiny-train:
        tasks:
          classification: {datasets: [imagefolder]}
        shots: [2]
        seeds: [1, 2]
    """
    exp = write_exp(tmp_path, folder_dataset, body)
    marker = tmp_path / "preempted"
    monkeypatch.setenv("PEFTBENCH_TEST_PREEMPT_AT", "4")  # 2 steps/epoch: the 4th step is in epoch 2
    monkeypatch.setenv("PEFTBENCH_TEST_PREEMPT_MARKER", str(marker))
    res = cli("sweep", exp, "--workers", "2")
    assert res.exit_code == 0, res.output
    assert marker.exists(), "the simulated preemption did not fire"
    store = ResultStore(tmp_path / "results")
    oks = ok_records(store)
    assert len(oks) == 2 and all(len(v) == 1 for v in oks.values())
    assert len(store.records()) == 2
    recs = [v[0] for v in oks.values()]
    resumed = [r for r in recs if r["train"]["resumed_from_step"] > 0]
    assert len(resumed) == 1 and resumed[0]["train"]["resumed_from_step"] == 2
    for r in recs:
        assert r["job"]["executor"] == "local" and Path(r["job"]["stdout"]).is_file()
    log = Path(resumed[0]["job"]["stdout"]).read_text() + Path(resumed[0]["job"]["stderr"]).read_text()
    assert "preempted" in log or "Requeued" in log
    assert not list((tmp_path / "results" / "checkpoints").glob("*.pt"))  # removed when a run finishes

    # The same grid, uninterrupted, in this process, into another store.
    monkeypatch.delenv("PEFTBENCH_TEST_PREEMPT_AT")
    res = cli("sweep", exp, "--results-dir", tmp_path / "plain")
    assert res.exit_code == 0, res.output
    plain = ResultStore(tmp_path / "plain")
    plain_oks = ok_records(plain)
    assert set(plain_oks) == set(oks)
    for h, (r,) in oks.items():
        (p,) = plain_oks[h]
        assert r["metrics"] == p["metrics"]
        assert r["train"]["final_loss"] == p["train"]["final_loss"]
        a, b = store.load_state(r), plain.load_state(p)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert any(a[k].abs().sum() > 0 for k in a)  # training moved the weights


def test_slurm_without_sbatch_suggests_local(tmp_path, folder_dataset, plugin_file, monkeypatch):
    exp = write_exp(tmp_path, folder_dataset, GRID)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    res = cli("sweep", exp, "--executor", "slurm")
    assert res.exit_code == 2
    assert "sbatch" in res.output and "--executor local" in res.output
    assert not (tmp_path / "results" / "runs").exists()


def test_slurm_array_parameters_reach_sbatch(tmp_path, folder_dataset, plugin_file, monkeypatch):
    """A fake `sbatch` records what submitit would submit: partition, GPUs, CPUs, memory, time,
    the array with its parallelism cap, and extra flags passed through."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sbatch = bindir / "sbatch"
    sbatch.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path / "sbatch_args"}\necho "Submitted batch job 4242"\n'
    )
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    srun = bindir / "srun"  # submitit checks that srun exists; it is only called inside jobs
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    exp = write_exp(
        tmp_path, folder_dataset, GRID + "    slurm: {partition: gpu, gpus_per_node: 1, mem_gb: 16}\n"
    )
    res = cli(
        "sweep",
        exp,
        "--executor",
        "slurm",
        "--cpus",
        "4",
        "--time-min",
        "90",
        "--array-parallelism",
        "2",
        "--chunk-size",
        "3",
        "--sbatch",
        "account=abc",
        "--sbatch",
        "qos=high",
    )
    assert res.exit_code == 0, res.output
    assert "submitted 2 slurm job(s)" in res.output  # 4 cells in chunks of 3
    script = next((tmp_path / "results" / "jobs").rglob("*submission_file*.sh")).read_text()
    for flag in (
        "--partition=gpu",
        "--gpus-per-node=1",
        "--cpus-per-task=4",
        "--mem=16GB",
        "--time=90",
        "--array=0-1%2",
        "--account=abc",
        "--qos=high",
    ):
        assert f"#SBATCH {flag}" in script, (flag, script)
    assert not (tmp_path / "results" / "runs").exists()  # nothing ran here


BAD = [
    (
        "seed: [1]\nmethods: {zeroshot: }\ntasks: {classification: {datasets: [imagefolder]}}\n",
        6,
        "unknown key 'seed'",
        "did you mean 'seeds'",
    ),
    (
        "methods:\n  tiny-train: {lrr: 0.1}\ntasks: {classification: {datasets: [imagefolder]}}\n",
        7,
        "unknown tiny-train config key 'lrr'",
        "did you mean 'lr'",
    ),
    (
        "methods:\n  zeroshoot:\ntasks: {classification: {datasets: [imagefolder]}}\n",
        7,
        "unknown method 'zeroshoot'",
        "did you mean 'zeroshot'",
    ),
    (
        "methods: {zeroshot: }\ntasks:\n  classification:\n    datasets: [imagefoldr]\n",
        9,
        "unknown dataset",
        "did you mean 'imagefolder'",
    ),
    (
        "methods: {zeroshot: }\ntasks:\n  clasification: {datasets: [imagefolder]}\n",
        8,
        "unknown task 'clasification'",
        "did you mean 'classification'",
    ),
    (
        "methods: {zeroshot: }\ntasks:\n  classification:\n    datasetz: [imagefolder]\n",
        9,
        "unknown key 'datasetz'",
        "valid keys: datasets, options",
    ),
    (
        "methods: {zeroshot: }\ntasks: {classification: {datasets: [imagefolder]}}\nslurm: {partiton: gpu}\n",
        8,
        "unknown key 'partiton'",
        "did you mean 'partition'",
    ),
    (
        "methods: {zeroshot: }\ntasks: {classification: {datasets: [imagefolder]}}\nshots: [0]\n",
        8,
        "shots must be an integer >= 1",
        "",
    ),
    ("methods: {zeroshot: \ntasks: []\n", 7, "malformed YAML", ""),
    ("methods: {}\ntasks: {classification: {datasets: [imagefolder]}}\n", 6, "the grid is empty", ""),
    (
        "methods: {zeroshot: }\nmethods: {coop: }\ntasks: {classification: {datasets: [imagefolder]}}\n",
        7,
        "duplicate key 'methods'",
        "first on line 6",
    ),
    (
        "methods: {zeroshot: }\ntasks:\n  ucdr:\n    datasets:\n"
        "      - {name: synth, options: {held_outt: sketch}}\n",
        10,
        "unknown ucdr task option key 'held_outt'",
        "did you mean 'held_out'",
    ),
]


@pytest.mark.parametrize(
    "body,line,message,hint", BAD, ids=[b[2].split("'")[0].strip() + str(i) for i, b in enumerate(BAD)]
)
def test_bad_experiment_files_fail_naming_file_line_and_choices(
    tmp_path, folder_dataset, plugin_file, body, line, message, hint
):
    exp = write_exp(tmp_path, folder_dataset, body)
    res = cli("sweep", exp)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"{exp}:{line}:" in text, text
    assert message in text and hint in text, text
    assert not (tmp_path / "results").exists()  # nothing written before the error


def test_unknown_backbone_lists_choices(tmp_path, folder_dataset, plugin_file):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "plugins: [sweep_test_plugin.py]\nbackbones: [tiny-tset]\nmethods: {zeroshot: }\n"
        "tasks: {classification: {datasets: [imagefolder]}}\n"
    )
    res = cli("sweep", exp, "--dry-run")
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert f"{exp}:2: unknown backbone 'tiny-tset' (did you mean 'tiny-test'?)" in text and "choices:" in text


def test_checkpoint_requeues_only_the_unfinished_runspecs(tmp_path):
    """What submitit pickles on preemption: a fresh job over the RunSpecs not yet finished."""
    from peftbench.runner import RunSpec
    from peftbench.sweep import JobSettings, SweepJob

    specs = [RunSpec(method="zeroshot", seed=s) for s in (1, 2, 3)]
    job = SweepJob(JobSettings(results_dir=str(tmp_path)))
    job.finished = 1  # the first RunSpec was handled before the signal arrived
    delayed = job.checkpoint(specs)
    assert isinstance(delayed.function, SweepJob) and delayed.function is not job
    assert delayed.function.finished == 0 and delayed.function.settings == job.settings
    assert delayed.args == (specs[1:],)
