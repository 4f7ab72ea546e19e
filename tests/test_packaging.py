"""`methods/` and `tasks/` are importable as peftbench.methods / peftbench.tasks after a regular
(wheel) install, not only from the editable checkout the test suite runs in."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_regular_install_maps_the_plugin_folders(tmp_path):
    # Build from a copy of the tracked files, so setuptools' build/ never lands in the checkout.
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in tracked.stdout.splitlines():
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            wheel_dir,
            src,
        ],
        check=True,
        cwd=tmp_path,
    )
    wheel = next(wheel_dir.glob("peftbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "peftbench/methods/zeroshot.py" in names and "peftbench/tasks/classification.py" in names
    assert not any(n.startswith(("methods/", "tasks/")) for n in names)  # no generic top-level packages

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel], check=True
    )
    code = (
        "import peftbench, peftbench.methods.zeroshot, peftbench.tasks.classification;"
        "from peftbench.registry import load_plugins, METHODS; load_plugins();"
        "assert 'zeroshot' in METHODS; print(peftbench.__file__)"
    )
    # Run outside the checkout, with the installed copy first on the path.
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
