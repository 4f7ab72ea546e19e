"""bench/learning_curve.py runs through the harness's trainer and prints what it names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "learning_curve.py"
spec = importlib.util.spec_from_file_location("learning_curve", BENCH)
learning_curve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning_curve)


def test_probe_prints_one_row_per_evaluation_and_the_calibration_table(capsys):
    argv = ["--method", "ln_tune", "--dataset", "synth_sketch", "--shots", "1", "--steps", "4",
            "--every", "2", "--test-per-class", "1", "--calibration"]
    assert learning_curve.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 0", "| 2", "| 4"]
    assert "4 steps" in out and "120 test images" in out  # one test image for each of 120 classes
    assert "| shape, given the colour |" in out and "(native)" in out
    # Step 0 is the untrained method: ln_tune starts as zero-shot, so it has no training loss yet.
    assert rows[0].split(" | ")[1] == "-"


def test_probe_rejects_bad_input(capsys):
    assert learning_curve.main(["--method", "ln_tune", "--steps", "0"]) == 2
    assert learning_curve.main(["--method", "nope", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "nope" in err
