"""Shared fixtures: a tiny open_clip config (no network, no weights) and generated datasets."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as peftbench/__init__.py does, before torch loads

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peftbench.backbone import load_backbone, register_shipped_backbone

torch.set_num_threads(1)  # steady timings on a loaded 2-core machine

TINY_CONFIG = Path(__file__).parent / "tiny-test.json"
# Image tower 2 blocks of width 64, text tower 2 blocks of width 48, joint 32 (< both widths, so
# MAIL's exact fold of the final projections applies), context 32 tokens (CoOp's 16 + a name).
register_shipped_backbone("tiny-test", TINY_CONFIG, None)
TINY = "tiny-test"

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20)]


@pytest.fixture(scope="session")
def tiny_backbone():
    return load_backbone(TINY, None)


@pytest.fixture
def backbone(tiny_backbone):
    """A fresh copy per test (methods may rewrite submodules)."""
    return tiny_backbone.copy()


def make_image(colour, index: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(index)
    arr = np.full((size, size, 3), 255, np.uint8)
    x0, y0 = rng.integers(2, size // 3, 2)
    arr[y0 : y0 + size // 2, x0 : x0 + size // 2] = colour
    arr = np.clip(arr.astype(int) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def write_imagefolder(root: Path, classes=("red", "green", "blue", "yellow"), per_class: int = 10) -> Path:
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(COLOURS[ci % len(COLOURS)], ci * 100 + i).save(root / c / f"{c}_{i:03d}.png")
    return root


@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    return write_imagefolder(tmp_path / "data")
