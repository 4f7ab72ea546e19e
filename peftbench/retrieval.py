"""Retrieval metrics, implemented once: mAP@K, Prec@K and mAP@all (protocols.md, "Metrics").

Relevance = same class label. For one query with its gallery ranked best first:

    Prec@K = hits in the top K' / K'                       with K' = min(K, N)
    AP@K   = sum_{i <= K'} precision@i * rel_i / hits in the top K'   (0 when there is none)
    mAP@K  = mean of AP@K over the queries;  mAP@all = mAP@N

Edge cases the reference codes disagree on, decided once here (recorded in every run via
:data:`RULES`):
- **Ties**: tied similarities (exactly equal computed values) are ordered by gallery index (lower
  index ranks first), a stable and deterministic rule. It is exact: `topk` is used where no tie
  can be affected, and every row where `topk` could have broken a tie is re-ranked by a stable sort
  (see `_chunk_top`). -0.0 and +0.0 are the same similarity.
- **K larger than the gallery** (N items): K is capped at N for both mAP@K and Prec@K
  (Prec@K = hits / min(K, N)); the cap used is returned.
- **Zero vectors**: L2 normalisation uses eps = 1e-12, so a zero vector has cosine 0 with every
  item (it ties, it never becomes NaN and never ranks first by accident). A NaN similarity is an
  error, not a silent rank.
- **What is ranked**: the similarity itself, never exp(-distance) (which underflows to ties):
  cosine of L2-normalised features in float32 (the features' own precision), or the negative
  squared Euclidean distance of the raw features in float64 (orders exactly as the negative
  distance; float64 because the norm expansion cancels in float32). AP is accumulated in float64.

Memory is bounded: queries are processed in chunks and, for K < N, the gallery in chunks too
(a running top-K is merged across gallery chunks); the largest buffer holds about `budget`
similarities (plus their int64 indices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-12  # L2-normalisation epsilon (same as peftbench.method.EPS)
SIMILARITIES = ("cosine", "euclidean")
RULES = {
    "ties": "stable: tied similarities ranked by gallery index, lowest first",
    "k_cap": "K capped at the gallery size N for mAP@K and Prec@K (Prec@K = hits / min(K, N))",
    "l2_eps": EPS,
    "ranked_on": "the similarity itself: float32 cosine, or float64 negative squared Euclidean distance",
    "ap_accumulation": "float64",
}


@dataclass
class RetrievalResult:
    """Mean metrics over the queries, and the K values actually used (after the cap at N)."""

    map: float  # mAP@K (mAP@all when map_k is None)
    prec: float  # Prec@K
    map_k: int  # K used for mAP (capped at N)
    prec_k: int  # K used for Prec (capped at N)
    n_queries: int
    n_gallery: int
    k_capped: bool  # whether a requested K was larger than the gallery


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation with eps: a zero row stays zero (never NaN)."""
    return F.normalize(x, dim=-1, eps=EPS)


def similarity(queries: torch.Tensor, gallery: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """(Q, D) x (N, D) -> (Q, N) similarity, higher = more similar.

    cosine: dot products of L2-normalised rows (normalise before calling, see `retrieval_metrics`).
    euclidean: -||q - g||^2 of the raw rows (orders as -||q - g||).
    """
    if kind == "cosine":
        return queries @ gallery.t()
    if kind == "euclidean":
        qq = (queries * queries).sum(-1, keepdim=True)  # (Q, 1)
        gg = (gallery * gallery).sum(-1)[None]  # (1, N)
        d2 = qq + gg - 2 * queries @ gallery.t()  # (Q, N)
        return -d2.clamp_min_(0)
    raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {kind!r}")


def _chunk_top(sims: torch.Tensor, k: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G) similarities of gallery items offset..offset+G -> the top k (values, global indices),
    best first, tied values in gallery-index order.

    `topk` alone orders ties arbitrarily, so rows where it could have broken a tie (two equal values
    inside the top k, or more items equal to the k-th value than were taken) are re-ranked by a
    stable sort; on tie-free rows `topk` is already the stable ranking. k >= G: a stable sort.
    """
    if torch.isnan(sims).any():
        raise ValueError("NaN similarity: features contain NaN or inf")
    k = min(k, sims.shape[1])
    if k == sims.shape[1]:
        vals, order = torch.sort(sims, dim=1, descending=True, stable=True)
        return vals, order + offset
    vals, order = torch.topk(sims, k, dim=1, sorted=True)  # (B, k)
    kth = vals[:, -1:]
    dup = (vals[:, 1:] == vals[:, :-1]).any(dim=1)  # (B,) a tie inside the top k (also -0.0 == 0.0)
    boundary = (sims == kth).sum(dim=1) > (vals == kth).sum(dim=1)  # (B,) a tie cut by the top k
    rows = dup.logical_or_(boundary).nonzero().squeeze(1)
    if rows.numel():
        v, o = torch.sort(sims[rows], dim=1, descending=True, stable=True)
        vals[rows], order[rows] = v[:, :k], o[:, :k]
    return vals, order + offset


def ranked_indices(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    kind: str = "cosine",
    gallery_chunk: int = 16384,
) -> torch.Tensor:
    """(B, D), (N, D) -> (B, k) gallery indices of the top k under the stable tie rule.

    Features must already be normalised for cosine. The gallery is visited in chunks with a
    running top-k (merged by a stable sort), so memory is O(B * (k + gallery_chunk)).
    """
    n = gallery.shape[0]
    k = min(k, n)
    if k == n:  # the whole row is ranked anyway: one stable sort, no merge
        gallery_chunk = n
    best_v: torch.Tensor | None = None  # (B, k) running top similarities, best first
    best_i: torch.Tensor | None = None  # (B, k) their gallery indices
    for start in range(0, n, gallery_chunk):
        v, i = _chunk_top(similarity(queries, gallery[start : start + gallery_chunk], kind), k, start)
        if best_v is not None:
            # earlier chunks hold lower indices and come first: a stable sort keeps ties in index order
            v, i = torch.cat([best_v, v], dim=1), torch.cat([best_i, i], dim=1)
            v, order = torch.sort(v, dim=1, descending=True, stable=True)
            v, i = v[:, :k], i.gather(1, order[:, :k])
        best_v, best_i = v, i
    return best_i


def retrieval_metrics(
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_features: torch.Tensor,
    gallery_labels: torch.Tensor,
    map_k: int | None = 200,
    prec_k: int = 200,
    kind: str = "cosine",
    budget: int = 1 << 23,
    gallery_chunk: int = 16384,
) -> RetrievalResult:
    """mAP@map_k (None = mAP@all) and Prec@prec_k of queries against a gallery.

    query_features (Q, D), gallery_features (N, D), labels (Q,) and (N,) of any integer dtype.
    `budget` bounds the similarities held at once per query chunk (default 8M: 32 MB of float32
    plus 64 MB of indices for a sort).
    """
    if kind not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {kind!r}")
    n_q, n = query_features.shape[0], gallery_features.shape[0]
    if n == 0 or n_q == 0:
        raise ValueError(f"retrieval needs queries and a gallery (got {n_q} queries, {n} gallery items)")
    want_map = n if map_k is None else map_k
    mk, pk = min(want_map, n), min(prec_k, n)
    kmax = max(mk, pk)
    if kind == "cosine":
        q, g = l2_normalize(query_features.float()), l2_normalize(gallery_features.float())
    else:
        q, g = query_features.double(), gallery_features.double()
    glab = gallery_labels.to(q.device).to(torch.int32)
    qlab = query_labels.to(q.device).to(torch.int32)
    width = n if kmax >= n else min(n, kmax + gallery_chunk)
    rows = max(1, budget // width)  # query chunk size
    ap_sum = torch.zeros((), dtype=torch.float64)
    prec_sum = torch.zeros((), dtype=torch.float64)
    ranks = torch.arange(1, mk + 1, dtype=torch.float64, device=q.device)  # (mk,)
    for start in range(0, n_q, rows):
        idx = ranked_indices(q[start : start + rows], g, kmax, kind, gallery_chunk)  # (B, kmax)
        rel = glab[idx] == qlab[start : start + rows, None]  # (B, kmax) bool
        rel_m = rel[:, :mk]
        hits_cum = rel_m.cumsum(dim=1, dtype=torch.int32)  # (B, mk) exact integer counts
        hits = hits_cum[:, -1].to(torch.float64)  # (B,)
        # precision@i only where rel_i = 1 (a few per row): sum them per query in float64
        r, c = rel_m.nonzero(as_tuple=True)  # (M,), (M,)
        prec_at = hits_cum[r, c].to(torch.float64) / ranks[c]  # (M,)
        ap = torch.zeros(len(hits), dtype=torch.float64, device=q.device).index_add_(0, r, prec_at)
        ap = ap / hits.clamp_min(1)  # 0 when no hit
        ap_sum += ap.sum().cpu()
        prec_sum += (rel[:, :pk].sum(dim=1).to(torch.float64) / pk).sum().cpu()
    return RetrievalResult(
        map=float(ap_sum / n_q),
        prec=float(prec_sum / n_q),
        map_k=mk,
        prec_k=pk,
        n_queries=n_q,
        n_gallery=n,
        k_capped=want_map > n or prec_k > n,
    )
