"""Retrieval metrics, implemented once: mAP@K, Prec@K and mAP@all (protocols.md, "Metrics").

Relevance = same class label. For one query with its gallery ranked best first:

    Prec@K = hits in the top K' / K'                       with K' = min(K, N)
    AP@K   = sum_{i <= K'} precision@i * rel_i / hits in the top K'   (0 when there is none)
    mAP@K  = mean of AP@K over the queries;  mAP@all = mAP@N

Edge cases the reference codes disagree on, decided once here (recorded in every run via
:data:`RULES`):
- **Ties**: tied similarities are ordered by gallery index (lower index ranks first), a stable and
  deterministic rule. It is exact, not approximate: each similarity is mapped to an order-preserving
  32-bit integer and combined with the reversed gallery index into one unique 64-bit key, so
  `topk` on the keys is the stable ranking (no tie is left for `topk` to break arbitrarily).
  -0.0 and +0.0 are the same similarity.
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
(a running top-K is merged across gallery chunks); the largest buffer holds about
`budget` 64-bit keys.
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


def _rank_keys(sims: torch.Tensor, offset: int, n_total: int) -> torch.Tensor:
    """(B, G) float similarities of gallery items offset..offset+G -> unique int64 ranking keys.

    key = ordered_int32(sim) * 2^32 + (n_total - 1 - global_index): larger key = ranked earlier;
    equal similarities are ordered by gallery index (lower first).
    """
    if torch.isnan(sims).any():
        raise ValueError("NaN similarity: features contain NaN or inf")
    s = (sims.float() + 0.0).contiguous()  # + 0.0 maps -0.0 to +0.0
    bits = s.view(torch.int32)
    # IEEE-754 floats order as sign-magnitude integers: flip the magnitude bits of negatives.
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # (B, G)
    index = torch.arange(offset, offset + s.shape[1], dtype=torch.int64, device=s.device)
    return ordered * (1 << 32) + (n_total - 1 - index)[None]


def _index_of(keys: torch.Tensor, n_total: int) -> torch.Tensor:
    return n_total - 1 - (keys & 0xFFFFFFFF)


def ranked_indices(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    kind: str = "cosine",
    gallery_chunk: int = 16384,
) -> torch.Tensor:
    """(B, D), (N, D) -> (B, k) gallery indices of the top k under the stable tie rule.

    Features must already be normalised for cosine. The gallery is visited in chunks with a
    running top-k, so memory is O(B * (k + gallery_chunk)); k = N sorts whole rows.
    cosine (float32 features): exact via unique int64 keys and `topk`. euclidean: float64
    distances (the norm expansion cancels badly in float32), ranked by a stable sort; the running
    top-k holds earlier (lower-index) items first, so ties stay in gallery-index order.
    """
    n = gallery.shape[0]
    k = min(k, n)
    if kind != "cosine":
        return _ranked_by_stable_sort(queries, gallery, k, kind, gallery_chunk)
    if k >= n or gallery_chunk >= n:
        keys = _rank_keys(similarity(queries, gallery, kind), 0, n)
        if k < n:
            top = torch.topk(keys, k, dim=1, sorted=True).values
        else:
            top = keys.sort(dim=1, descending=True).values
        return _index_of(top, n)
    best: torch.Tensor | None = None  # (B, k) running top keys
    for start in range(0, n, gallery_chunk):
        g = gallery[start : start + gallery_chunk]
        keys = _rank_keys(similarity(queries, g, kind), start, n)  # (B, Gc)
        if best is not None:
            keys = torch.cat([best, keys], dim=1)
        best = torch.topk(keys, min(k, keys.shape[1]), dim=1, sorted=False).values
    best = best.sort(dim=1, descending=True).values
    return _index_of(best, n)


def _ranked_by_stable_sort(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, kind: str, gallery_chunk: int
) -> torch.Tensor:
    n = gallery.shape[0]
    best_s: torch.Tensor | None = None  # (B, k) similarities, best first
    best_i: torch.Tensor | None = None  # (B, k) their gallery indices
    for start in range(0, n, gallery_chunk):
        s = similarity(queries, gallery[start : start + gallery_chunk], kind)  # (B, Gc)
        if torch.isnan(s).any():
            raise ValueError("NaN similarity: features contain NaN or inf")
        idx = torch.arange(start, start + s.shape[1], device=s.device).expand(s.shape[0], -1)
        if best_s is not None:
            s, idx = torch.cat([best_s, s], dim=1), torch.cat([best_i, idx], dim=1)
        vals, order = torch.sort(s, dim=1, descending=True, stable=True)
        best_s, best_i = vals[:, :k], idx.gather(1, order[:, :k])
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
    `budget` bounds the number of 64-bit keys held at once (default 8M = 64 MB per buffer).
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
    glab = gallery_labels.to(q.device).long()
    qlab = query_labels.to(q.device).long()
    width = n if kmax >= n else min(n, kmax + gallery_chunk)
    rows = max(1, budget // width)  # query chunk size
    ap_sum = torch.zeros((), dtype=torch.float64)
    prec_sum = torch.zeros((), dtype=torch.float64)
    ranks = torch.arange(1, mk + 1, dtype=torch.float64, device=q.device)  # (mk,)
    for start in range(0, n_q, rows):
        idx = ranked_indices(q[start : start + rows], g, kmax, kind, gallery_chunk)  # (B, kmax)
        rel = glab[idx] == qlab[start : start + rows, None]  # (B, kmax) bool
        rel_m = rel[:, :mk].to(torch.float64)
        hits_cum = rel_m.cumsum(dim=1)  # (B, mk)
        hits = hits_cum[:, -1]
        ap = (hits_cum / ranks * rel_m).sum(dim=1) / hits.clamp_min(1)  # 0 when no hit
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
