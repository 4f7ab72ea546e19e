"""The CLI through typer's CliRunner: end-to-end runs, listings, and every bad-input error."""

from __future__ import annotations

import json

import pytest
from conftest import TINY
from typer.testing import CliRunner

from peftbench.cli import app
from peftbench.results import ResultStore

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_args(tmp_path, data_root, *extra):
    return [
        "run",
        "--method",
        "zeroshot",
        "--task",
        "classification",
        "--dataset",
        "imagefolder",
        "--data-root",
        data_root,
        "--backbone",
        TINY,
        "--pretrained",
        "none",
        "--results-dir",
        tmp_path / "res",
        "--no-progress",
        *extra,
    ]


def test_run_zeroshot_end_to_end_writes_records_and_skips_on_rerun(tmp_path, folder_dataset):
    res = invoke(*run_args(tmp_path, folder_dataset, "--shots", "1,2", "--seeds", "1"))
    assert res.exit_code == 0, res.output
    recs = ResultStore(tmp_path / "res").records()
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs)
    rec = recs[0]
    for key in (
        "schema",
        "spec",
        "resolved",
        "config_hash",
        "metrics",
        "params",
        "timing",
        "data",
        "versions",
        "peak_memory",
        "device",
    ):
        assert key in rec
    assert rec["metrics"]["acc"]["direction"] == "higher"
    assert rec["data"]["split_sha256"] and rec["data"]["files_sha256"]
    assert rec["task_info"]["train_crop_scale"] == [0.08, 1.0]  # CoOp's augmentation, recorded
    assert (tmp_path / "res" / "splits" / "classification" / "imagefolder" / "shots1_seed1.json").is_file()

    again = invoke(*run_args(tmp_path, folder_dataset, "--shots", "1,2", "--seeds", "1"))
    assert again.exit_code == 0 and "2 skipped-ok (2 cells)" in again.stdout
    assert len(ResultStore(tmp_path / "res").records()) == 2

    shown = invoke("show", tmp_path / "res", "--json")
    assert shown.exit_code == 0 and len(json.loads(shown.stdout)) == 2


def test_data_root_from_environment(tmp_path, folder_dataset, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_DATA", str(folder_dataset))
    args = [a for a in run_args(tmp_path, folder_dataset) if a != folder_dataset and a != "--data-root"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"--method": "zeroshott"}, "unknown method 'zeroshott' (did you mean 'zeroshot'?)"),
        ({"--task": "classify"}, "unknown task 'classify'"),
        ({"--dataset": "imagefoldr"}, "did you mean 'imagefolder'"),
        ({"--backbone": "ViT-B-61"}, "unknown backbone 'ViT-B-61'"),
        ({"--data-root": "/no/such/dir"}, "/no/such/dir not found (expected layout"),
        ({"--shots": "1,two"}, "--shots expects comma-separated positive integers"),
        ({"--shots": "0"}, "--shots expects comma-separated positive integers"),
        ({"--seeds": "x"}, "--seeds expects comma-separated"),
        ({"--set": "epochz=3"}, "unknown zeroshot config key 'epochz' (did you mean 'epochs'?)"),
        ({"--set": "task.heldout=x"}, "unknown classification task option key 'heldout'"),
        ({"--set": "batch_size=0"}, "batch_size: must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, folder_dataset, change, fragment):
    args = run_args(tmp_path, folder_dataset)
    for opt, value in change.items():
        if opt in args:
            args[args.index(opt) + 1] = value
        else:
            args += [opt, value]
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert fragment in " ".join(res.stderr.split()), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "res" / "runs").exists()


def test_missing_data_root_says_how_to_pass_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTBENCH_DATA", raising=False)
    res = invoke(
        "run",
        "--dataset",
        "imagefolder",
        "--backbone",
        TINY,
        "--pretrained",
        "none",
        "--results-dir",
        tmp_path / "res",
    )
    assert res.exit_code == 2 and "--data-root" in res.stderr and "PEFTBENCH_DATA" in res.stderr


def test_strict_shots_turns_the_short_class_warning_into_an_error(tmp_path, folder_dataset):
    ok = invoke(*run_args(tmp_path, folder_dataset, "--shots", "8"))
    assert ok.exit_code == 0, ok.output
    rec = ResultStore(tmp_path / "res").records()[0]
    assert rec["data"]["short_groups"] == {c: 6 for c in ("blue", "green", "red", "yellow")}  # < 8: recorded
    strict = invoke(*run_args(tmp_path, folder_dataset, "--shots", "8", "--seeds", "2", "--strict-shots"))
    assert strict.exit_code == 2 and "--strict-shots" in strict.stderr


def test_list_and_params_json(tmp_path):
    for kind in ("methods", "tasks", "datasets", "backbones"):
        res = invoke("list", kind, "--json")
        assert res.exit_code == 0, res.output
        assert isinstance(json.loads(res.stdout), list)
    names = [m["name"] for m in json.loads(invoke("list", "methods", "--json").stdout)]
    assert "zeroshot" in names
    assert invoke("list", "metods").exit_code == 2
    res = invoke("params", "--method", "zeroshot", "--backbone", TINY, "--json")
    out = json.loads(res.stdout)
    assert out["trainable"] == 0 and out["total"] > 0


def test_show_on_an_empty_store_says_how_to_produce_runs(tmp_path):
    res = invoke("show", tmp_path / "empty")
    assert res.exit_code == 0 and "peftbench run" in res.stderr


@pytest.mark.parametrize("cmd", [[], ["run"], ["list"], ["show"], ["params"]])
def test_help_everywhere(cmd):
    res = invoke(*cmd, "--help")
    assert res.exit_code == 0 and "Usage" in res.stdout
