"""Ranking metrics for leave-one-out splits: recall@k, NDCG@k and top-k overlap.

Items a user interacted with before the held-out one are excluded from the ranking. With one
held-out item per user, recall@k is the share of users whose item ranks in the top k, and
NDCG@k is the mean of ``1 / log2(rank + 2)`` over those users (rank 0 is the top). Items scored
equal to the held-out one count as half above it: its expected rank when ties are broken at random
(a constant model is not rewarded, and rank averaging, which ties often, is not punished).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..measure import register_column
from .data import HeldOut

CHUNK = 1024  # users scored at once


def _check_split(split) -> HeldOut:
    if not isinstance(split, HeldOut):
        raise ConfigError("ranking metrics need a held-out split (Interactions.val or .test), "
                          f"got {type(split).__name__}")
    return split


@torch.inference_mode()
def scores(model: nn.Module, split: HeldOut, *, exclude: bool = True) -> torch.Tensor:
    """Scores (rows, n_items) of ``model`` for ``split``'s users; excluded items -inf (``exclude``)."""
    split = _check_split(split)
    was_training = model.training
    model.eval()
    try:
        out = []
        for lo in range(0, len(split), CHUNK):
            s = model(split.x[lo : lo + CHUNK]).float()
            if exclude:
                s = s.masked_fill(split.exclusion_mask(s.shape[1], slice(lo, lo + CHUNK)), float("-inf"))
            out.append(s)
    finally:
        model.train(was_training)
    return torch.cat(out)


def ranks(masked_scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based (expected) rank of each row's target among its non-excluded items; ties count half."""
    t = masked_scores.gather(1, targets[:, None])
    return (masked_scores > t).sum(1) + ((masked_scores == t).sum(1) - 1) / 2


def recall_at(rank: torch.Tensor, k: int) -> float:
    return (rank < k).float().mean().item()


def ndcg_at(rank: torch.Tensor, k: int) -> float:
    gain = 1.0 / torch.log2(rank.double() + 2.0)
    return torch.where(rank < k, gain, torch.zeros_like(gain)).mean().item()


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean share of the top-k items (of masked scores ``a`` and ``b``) that the two have in common."""
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return (ta[:, :, None] == tb[:, None, :]).any(2).float().sum(1).div(k).mean().item()


def rank_metrics(masked: torch.Tensor, split: HeldOut, k: int, reference: torch.Tensor | None = None) -> dict:
    _check_k(k, masked.shape[1])
    r = ranks(masked, split.y)
    out = {f"ndcg@{k}": ndcg_at(r, k), f"recall@{k}": recall_at(r, k)}
    if reference is not None:
        out[f"overlap@{k}"] = topk_overlap(masked, reference, k)
    return out


def _check_k(k: int, n_items: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_items:
        raise ConfigError(f"k must be an integer in 1..{n_items}, got {k!r}")


def evaluate(model: nn.Module, split: HeldOut, *, k: int = 10, reference: nn.Module | None = None) -> dict:
    """``{"ndcg@k", "recall@k"}`` of ``model`` on ``split`` (and ``overlap@k`` with ``reference``'s top k)."""
    ref = scores(reference, split) if reference is not None else None
    return rank_metrics(scores(model, split), split, k, ref)


def score(k: int = 10, *, reference: nn.Module | None = None):
    """A ``score`` for ``slimfuse.measure``: ``measure(models, data.test, score=score(10), metric="ndcg@10")``.

    With ``reference`` (the uncompressed model) each row also gets ``overlap@k``, the share of the
    reference's top k that the model keeps. The reference's scores are computed once per split.
    """
    for key, label in ((f"ndcg@{k}", f"NDCG@{k}"), (f"recall@{k}", f"recall@{k}")):
        register_column(key, label)
    if reference is not None:
        register_column(f"overlap@{k}", f"top-{k} overlap")
    cache: dict = {}

    def fn(model: nn.Module, split) -> dict:
        ref = None
        if reference is not None:
            if cache.get("split") is not split:
                cache.update(split=split, scores=scores(reference, split))
            ref = cache["scores"]
        return rank_metrics(scores(model, split), split, k, ref)

    return fn
