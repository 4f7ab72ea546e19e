"""The evidence tables in docs/evidence/ are a pure function of the records kept next to them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "render_evidence.py"
spec = importlib.util.spec_from_file_location("render_evidence", BENCH)
render_evidence = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_evidence)

STORES = render_evidence.stores()


def test_evidence_stores_are_kept():
    names = {p.parent.name for p in STORES}
    assert {"synth_world", "baselines"} <= names, names


@pytest.mark.parametrize("store", STORES, ids=[p.parent.name for p in STORES])
def test_rendered_tables_match_the_committed_ones(store):
    committed = (store.parent / "report.md").read_text()
    assert render_evidence.render(store) == committed, "stale: run python bench/render_evidence.py"
