"""Full-catalogue ranking metrics, per user group, and item-side (long-tail) metrics.

Conventions (see DESIGN.md, "Evaluation conventions"):

- every catalogue item is ranked (no sampled negatives, which inflate numbers);
- items in the user's history are excluded from the ranking, except the target
  itself when the user consumed it before (a repeat), which stays rankable;
- ties with the target count against it, so a constant scorer gets no credit;
- scores must be comparable: a NaN or +infinity anywhere is refused (``require_rankable``), since NaN compares
  false with everything and would rank every target first; -infinity means "never recommended" and ranks last;
- users are grouped by training-history length: tail = bottom 20%, head = top
  20%, torso = the rest; all users of one length fall in the same group (the
  threshold decides), so group sizes can differ from 20% and are reported.

Beyond accuracy, per list: intra-list diversity (mean pairwise cosine distance
of the list's item vectors) and miscalibration (Steck 2018: how far the
list's category mix is from the mix of the user's history).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.data.catalog import PADDING_INDEX
from common.errors import NonFiniteError

KS = (10, 20)
GROUPS = ("tail", "torso", "head")
GROUP_SHARE = 0.2
CALIBRATION_ALPHA = 0.01
"""Steck's smoothing: the list's category mix is (1 - alpha) q + alpha p, so KL(p || .) stays finite."""


def exclusion_mask(histories: Sequence[np.ndarray], targets: torch.Tensor, width: int) -> torch.Tensor:
    """[B, N] True for indices that must not be recommended: padding and seen items (not the target)."""
    mask = torch.zeros((len(histories), width), dtype=torch.bool)
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    columns = np.concatenate(histories) if histories else np.zeros(0, dtype=np.int64)
    mask[torch.from_numpy(rows), torch.from_numpy(columns.astype(np.int64))] = True
    mask[:, PADDING_INDEX] = True
    mask[torch.arange(len(histories)), targets.cpu()] = False
    return mask


def require_rankable(scores: torch.Tensor) -> None:
    """Refuse scores holding NaN or +infinity, before any rank is computed from them.

    With rank = #(scores >= target score), a NaN target compares false with every item and ranks first: an all-NaN
    model would score NDCG@10 = 1.0 and be kept as the best round. Every evaluation path (``fedtail evaluate``, the
    server's validation and test, training's validation, benchmarks) ranks through ``rank_targets``, so this is the
    one check. -infinity stays allowed: re-ranking gives it to items a prior rules out, and it ranks last.

    scores: [B, N].
    """
    broken = torch.isnan(scores) | torch.isposinf(scores)
    if bool(broken.any()):
        cases = int(broken.any(dim=1).sum())
        raise NonFiniteError(
            f"evaluation refused: the model's scores hold NaN or infinity for {cases} of {len(scores)} users in a "
            "batch (its weights are not finite, or overflow); no metric is reported for a non-finite model"
        )


def rank_targets(scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among the items that are not excluded; ties count against it.

    scores: [B, N]; targets: [B]; excluded: [B, N] bool. Scores with NaN or +infinity are refused.
    """
    require_rankable(scores)
    target_scores = scores.gather(1, targets.unsqueeze(1))  # [B, 1]
    competitors = ~excluded
    competitors[torch.arange(len(targets)), targets] = False
    return ((scores >= target_scores) & competitors).sum(dim=1)


def top_k(scores: torch.Tensor, excluded: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] highest-scoring non-excluded indices; PADDING_INDEX fills slots when fewer than k are left."""
    masked = scores.masked_fill(excluded, float("-inf"))
    best = masked.topk(min(k, scores.shape[1]), dim=1)
    return best.indices.masked_fill(torch.isneginf(best.values), PADDING_INDEX)


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """HR@K, NDCG@K, MRR@K from 0-based target ranks (one held-out item per user)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if len(ranks) else 0.0
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean()) if len(ranks) else 0.0
    return out


def user_groups(training_lengths: np.ndarray) -> np.ndarray:
    """Group name per user: 'tail' / 'torso' / 'head' by training-history length, ties kept together."""
    lengths = np.asarray(training_lengths)
    groups = np.full(len(lengths), "torso", dtype=object)
    if len(lengths) == 0:
        return groups
    ordered = np.sort(lengths)
    tail_threshold = ordered[max(0, int(np.ceil(GROUP_SHARE * len(ordered))) - 1)]
    head_threshold = ordered[min(len(ordered) - 1, int(np.floor((1 - GROUP_SHARE) * len(ordered))))]
    groups[lengths <= tail_threshold] = "tail"
    groups[(lengths >= head_threshold) & (lengths > tail_threshold)] = "head"
    return groups


def grouped_ranking_metrics(ranks: np.ndarray, training_lengths: np.ndarray) -> dict[str, dict[str, float]]:
    groups = user_groups(training_lengths)
    out: dict[str, dict[str, float]] = {}
    for name in GROUPS:
        selected = groups == name
        out[name] = {**ranking_metrics(ranks[selected]), "users": int(selected.sum())}
    return out


def item_metrics(recommended: np.ndarray, popularity: np.ndarray, num_users: int, k: int = 10) -> dict[str, float]:
    """Catalogue-side view of the top-k lists.

    recommended: [users, >=k] item indices, PADDING_INDEX for empty slots; popularity: [N] training counts per
    index (padding at 0). Long-tail items are those outside the top 20% most
    popular; novelty is the mean self-information -log2(p(i)) with p(i) the
    add-one-smoothed share of users who interacted with i.
    """
    catalogue = np.arange(1, len(popularity))
    lists = np.asarray(recommended)[:, :k]
    counts = np.bincount(lists.ravel(), minlength=len(popularity))[1:].astype(np.float64)
    coverage = float((counts > 0).mean())
    sorted_counts = np.sort(counts)
    n = len(sorted_counts)
    total = sorted_counts.sum()
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ sorted_counts / (n * total)) if total > 0 else 0.0
    by_popularity = catalogue[np.argsort(-popularity[1:], kind="stable")]
    head_items = by_popularity[: int(np.ceil(GROUP_SHARE * len(catalogue)))]
    is_tail_item = np.ones(len(popularity), dtype=bool)
    is_tail_item[head_items] = False
    shown = lists[lists != PADDING_INDEX]
    tail_share = float(is_tail_item[shown].mean()) if shown.size else 0.0
    self_information = -np.log2((popularity + 1.0) / (num_users + 1.0))
    novelty = float(self_information[shown].mean()) if shown.size else 0.0
    return {
        f"coverage@{k}": coverage,
        f"gini@{k}": gini,
        f"tail_share@{k}": tail_share,
        f"novelty@{k}": novelty,
    }


def intra_list_diversity(lists: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Per list: mean over pairs of its items of 1 - cosine similarity (NaN for a list of fewer than 2 items).

    lists: [users, k] item indices, PADDING_INDEX for empty slots; unit: [N, d] item vectors scaled to length 1
    (an item without a vector is a zero row: distance 1 to everything).
    """
    lists = np.asarray(lists)
    vectors = unit[lists]  # [users, k, d]
    similarity = vectors @ vectors.transpose(0, 2, 1)  # [users, k, k]
    real = lists != PADDING_INDEX
    pairs = real[:, :, None] & real[:, None, :] & ~np.eye(lists.shape[1], dtype=bool)[None]
    counts = pairs.sum(axis=(1, 2))
    distance = np.where(pairs, 1.0 - similarity, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, distance / np.maximum(counts, 1), np.nan)


def miscalibration(
    histories: Sequence[np.ndarray], lists: np.ndarray, categories: np.ndarray, alpha: float = CALIBRATION_ALPHA
) -> np.ndarray:
    """Per user: KL(p || (1 - alpha) q + alpha p), Steck (2018), in nats; NaN for an empty history or list.

    p: the category distribution of the user's history, q: that of the list, each the mean of its items'
    distributions (every item weighs the same); categories: [N, G], row i the distribution p(g | i) of item i
    (a row of zeros: the item has no category, and counts for nothing).
    """
    out = np.full(len(histories), np.nan)
    for user, (history, shown) in enumerate(zip(histories, np.asarray(lists), strict=True)):
        p = categories[np.asarray(history, dtype=np.int64)].sum(axis=0)
        q = categories[shown[shown != PADDING_INDEX]].sum(axis=0)
        if p.sum() <= 0 or q.sum() <= 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        present = p > 0
        out[user] = float((p[present] * np.log(p[present] / ((1 - alpha) * q[present] + alpha * p[present]))).sum())
    return out


def vector_clusters(vectors: np.ndarray, clusters: int, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """[N, clusters] one-hot category rows from spherical k-means of the item vectors (row 0, padding: zeros).

    Stands in for genres where items have none: items whose vectors point the same way share a cluster.
    """
    unit = vectors[1:] / np.maximum(np.linalg.norm(vectors[1:], axis=1, keepdims=True), 1e-12)
    clusters = min(clusters, len(unit))
    centres = unit[np.random.default_rng(seed).choice(len(unit), clusters, replace=False)]
    for _ in range(iterations):
        labels = np.argmax(unit @ centres.T, axis=1)
        for cluster in range(clusters):
            members = unit[labels == cluster]
            if len(members):
                centres[cluster] = members.sum(axis=0) / max(np.linalg.norm(members.sum(axis=0)), 1e-12)
    labels = np.argmax(unit @ centres.T, axis=1)
    one_hot = np.zeros((len(vectors), clusters))
    one_hot[np.arange(1, len(vectors)), labels] = 1.0
    return one_hot
