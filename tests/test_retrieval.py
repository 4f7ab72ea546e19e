"""peftbench.retrieval: agreement with sklearn on tie-free cases, and hand-computed golden cases for
the edge-case rules (stable ties by gallery index, K capped at N, zero vectors, -0.0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from peftbench.retrieval import RULES, _chunk_top, ranked_indices, retrieval_metrics


def sklearn_map_all(q, ql, g, gl, kind="cosine") -> float:
    if kind == "cosine":
        q = torch.nn.functional.normalize(q, dim=-1)
        g = torch.nn.functional.normalize(g, dim=-1)
        s = (q @ g.t()).double().numpy()
    else:
        s = -torch.cdist(q.double(), g.double()).numpy()
    aps = []
    for i in range(len(q)):
        rel = (gl == ql[i]).numpy()
        aps.append(average_precision_score(rel, s[i]) if rel.any() else 0.0)
    return float(np.mean(aps))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["cosine", "euclidean"])
def test_map_all_agrees_with_sklearn_on_tie_free_data(seed, kind):
    gen = torch.Generator().manual_seed(seed)
    q, g = torch.randn(40, 16, generator=gen), torch.randn(150, 16, generator=gen)
    ql, gl = torch.randint(0, 6, (40,), generator=gen), torch.randint(0, 6, (150,), generator=gen)
    expected = sklearn_map_all(q, ql, g, gl, kind)
    for chunks in ({}, {"budget": 300, "gallery_chunk": 17}):
        r = retrieval_metrics(q, ql, g, gl, map_k=None, prec_k=10, kind=kind, **chunks)
        assert r.map == pytest.approx(expected, abs=1e-12)
        assert r.map_k == 150 and not r.k_capped


def test_map_at_k_and_prec_at_k_golden():
    # 1-D features: query +1; gallery similarities 0.9, 0.8, 0.7, 0.6 (distinct), labels 1, 0, 0, 1
    q, ql = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    g = torch.tensor([[0.9, (1 - 0.81) ** 0.5], [0.8, 0.6], [0.7, (1 - 0.49) ** 0.5], [0.6, 0.8]])
    gl = torch.tensor([1, 0, 0, 1])
    r = retrieval_metrics(q, ql, g, gl, map_k=2, prec_k=2)
    assert r.map == pytest.approx(0.5)  # rel [0, 1]: (1/2) / 1 hit
    assert r.prec == pytest.approx(0.5)
    r = retrieval_metrics(q, ql, g, gl, map_k=3, prec_k=3)
    assert r.map == pytest.approx((1 / 2 + 2 / 3) / 2)  # rel [0, 1, 1]
    assert r.prec == pytest.approx(2 / 3)
    r = retrieval_metrics(q, ql, g, gl, map_k=1, prec_k=1)
    assert r.map == 0.0 and r.prec == 0.0  # no hit in the top 1: AP 0


def test_ties_are_ranked_by_gallery_index():
    q, ql = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    g = torch.ones(4, 2)  # every similarity ties
    gl = torch.tensor([0, 1, 1, 0])
    r = retrieval_metrics(q, ql, g, gl, map_k=None, prec_k=2)
    assert r.map == pytest.approx((1 / 1 + 2 / 4) / 2)  # stable order: rel [1, 0, 0, 1]
    assert r.prec == pytest.approx(1 / 2)
    # sklearn gives every relevant item of the tied block the block-end precision: 0.5 here
    assert average_precision_score([1, 0, 0, 1], [1.0] * 4) == pytest.approx(0.5)
    # partial ties: sims 0 (g0, label 0), 1 (g1, label 1), 1 (g2, label 0), 0 (g3, label 1)
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gl = torch.tensor([0, 1, 0, 1])
    r = retrieval_metrics(q, ql, g, gl, map_k=None, prec_k=1)
    assert r.map == pytest.approx((1 / 2 + 2 / 3) / 2)  # order g1, g2, g0, g3: rel [0, 1, 1, 0]
    assert r.prec == 0.0
    assert ranked_indices(q, torch.nn.functional.normalize(g, dim=-1), 4).tolist() == [[1, 2, 0, 3]]


def test_tie_rule_holds_across_gallery_chunks():
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-1, 2, (30, 3), generator=gen).float()  # coarse features: many exact ties
    g = torch.randint(-1, 2, (200, 3), generator=gen).float()
    full = ranked_indices(q, g, 50, "euclidean", gallery_chunk=10_000)
    chunked = ranked_indices(q, g, 50, "euclidean", gallery_chunk=7)
    assert torch.equal(full, chunked)
    # reference: a stable sort on (similarity desc, index asc)
    d2 = torch.cdist(q.double(), g.double()) ** 2
    ref = [sorted(range(200), key=lambda j, i=i: (round(float(d2[i, j]), 6), j))[:50] for i in range(30)]
    assert full.tolist() == ref
    ql, gl = torch.randint(0, 3, (30,), generator=gen), torch.randint(0, 3, (200,), generator=gen)
    a = retrieval_metrics(q, ql, g, gl, map_k=50, prec_k=20, kind="euclidean")
    b = retrieval_metrics(q, ql, g, gl, map_k=50, prec_k=20, kind="euclidean", budget=64, gallery_chunk=9)
    assert a.map == pytest.approx(b.map, abs=1e-12) and a.prec == pytest.approx(b.prec, abs=1e-12)
    # the cosine path (float32) keeps the same rule across chunks
    qn, gn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(g, dim=-1)
    full = ranked_indices(qn, gn, 50, "cosine", gallery_chunk=10_000)
    assert torch.equal(full, ranked_indices(qn, gn, 50, "cosine", gallery_chunk=7))
    cos = qn @ gn.t()  # the float32 values that are ranked: ties = exactly equal values
    ref = [sorted(range(200), key=lambda j, i=i: (-float(cos[i, j]), j))[:50] for i in range(30)]
    assert full.tolist() == ref


def test_k_larger_than_gallery_is_capped_at_n():
    q, ql = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # sims 1, 0, 0.707 -> order 0, 2, 1
    gl = torch.tensor([0, 1, 0])
    r = retrieval_metrics(q, ql, g, gl, map_k=200, prec_k=200)
    assert r.map_k == 3 and r.prec_k == 3 and r.k_capped
    assert r.map == pytest.approx(1.0)  # rel [1, 1, 0]
    assert r.prec == pytest.approx(2 / 3)  # hits / min(K, N)
    assert "min(K, N)" in RULES["k_cap"]


def test_zero_vectors_never_nan_and_never_first():
    q, ql = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    g = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])  # sims -1, 0 (zero vector), 1
    gl = torch.tensor([0, 1, 0])
    r = retrieval_metrics(q, ql, g, gl, map_k=None, prec_k=1)
    assert r.map == pytest.approx((1 + 2 / 3) / 2)  # order 2, 1, 0: rel [1, 0, 1]
    assert r.prec == 1.0
    # a zero query ties with everything: gallery index order, rel [0, 1]
    r = retrieval_metrics(
        torch.zeros(1, 2),
        ql,
        torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        torch.tensor([1, 0]),
        map_k=None,
        prec_k=1,
    )
    assert r.map == pytest.approx(0.5) and r.prec == 0.0 and np.isfinite(r.map)


def test_negative_zero_equals_zero_and_nan_is_an_error():
    zeros = torch.tensor([[0.0, -0.0, -0.0, 0.0, -1.0]])
    for k in (2, 3, 5):
        assert _chunk_top(zeros, k)[1].tolist() == [[0, 1, 2, 3, 4][:k]]
    top = _chunk_top(torch.tensor([[-2.0, -1.0, 0.5, -0.0, 3.0]]), 5, offset=10)[1]
    assert top.tolist() == [[14, 12, 13, 11, 10]]
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(
            torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), torch.ones(2, 2), torch.tensor([0, 1])
        )


def test_euclidean_ranks_on_raw_features():
    # the nearer item by distance wins even when cosine disagrees
    q, ql = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    g = torch.tensor([[10.0, 0.0], [1.0, 0.3]])  # cosine prefers g0, distance prefers g1
    gl = torch.tensor([1, 0])
    assert retrieval_metrics(q, ql, g, gl, map_k=None, prec_k=1, kind="euclidean").prec == 1.0
    assert retrieval_metrics(q, ql, g, gl, map_k=None, prec_k=1, kind="cosine").prec == 0.0
