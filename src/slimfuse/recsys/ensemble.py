"""Ensembles of recommenders: weighted score averaging or rank averaging.

Members' raw scores live on different scales, so ``score`` averaging standardizes each member's
scores per user (zero mean, unit variance over the items) before the weighted sum, and ``rank``
averaging replaces them by their normalized ranks (0 = worst item, 1 = best). Weights are learned
on the validation split by greedy ensemble selection with replacement (Caruana et al. 2004) on
NDCG@k, over cached member scores: members are never re-run while weights are searched.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..models import zoo
from ..models.spec import attach, lineage_of, lineage_str, spec_of
from ..validate import check
from .data import Interactions
from .metrics import _check_k, ndcg_at, ranks, scores

METHODS = ("score", "rank")


def normalize(s: torch.Tensor, method: str) -> torch.Tensor:
    """Per row: standardized scores (``score``) or ranks scaled to [0, 1] (``rank``)."""
    if method == "score":
        return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-12)
    return s.argsort(-1).argsort(-1).float() / max(1, s.shape[-1] - 1)


class RecEnsemble(nn.Module):
    """``members`` (each: user ids -> item scores) combined by weighted ``score`` or ``rank`` averaging."""

    def __init__(self, members, method: str = "score", weights=None):
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        self.members, self.method = nn.ModuleList(members), method
        k = len(members)
        w = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights, dtype=torch.float32).clone()
        if w.shape != (k,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"weights must be {k} non-negative numbers with a positive sum, got {w.tolist()}")
        self.register_buffer("weights", w / w.sum())

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return combine([normalize(m(users).float(), self.method) if w > 0 else None
                        for w, m in zip(self.weights, self.members)], self.weights)


def combine(normed: list, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum of normalized member scores (members with weight 0 may be None)."""
    out = None
    for w, n in zip(weights, normed):
        if w > 0:
            out = w * n if out is None else out + w * n
    return out


@zoo.register("rec-ensemble")
def rec_ensemble(members: list, method: str = "score", k: int | None = None) -> nn.Module:
    """Rebuild an ensemble of recommenders from its members' specs (weights come with the tensors)."""
    ens = RecEnsemble([zoo.build(s) for s in members], method)
    return attach(ens, {"arch": "rec-ensemble", "args": {"members": members, "method": method, "k": k}})


def select(member_scores: list[torch.Tensor], split, *, method: str, k: int,
           rounds: int = 25) -> tuple[list[float], float]:
    """Greedy selection with replacement on NDCG@k of cached raw member scores; (weights, best NDCG)."""
    excluded = split.exclusion_mask(member_scores[0].shape[1])
    normed = [normalize(s, method).masked_fill(excluded, float("-inf")) for s in member_scores]
    counts = torch.zeros(len(normed))
    best_weights, best = None, -1.0
    for _ in range(rounds):
        trial = []
        for j in range(len(normed)):  # combined exactly as RecEnsemble.forward will combine them
            w = counts.clone()
            w[j] += 1
            trial.append(ndcg_at(ranks(combine(normed, w / w.sum()), split.y), k))
        i = max(range(len(normed)), key=lambda j: trial[j])
        counts[i] += 1
        if trial[i] > best + 1e-9:
            best, best_weights = trial[i], (counts / counts.sum()).tolist()
    return best_weights, best


def ensemble(members: list[nn.Module], data: Interactions, *, method: str = "score", k: int = 10,
             weights: list[float] | None = None) -> RecEnsemble:
    """Combine recommenders; without ``weights``, learn them on ``data.val`` NDCG@k (greedy selection)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if not members:
        raise ConfigError("an ensemble needs at least one member")
    _check_k(k, data.n_items)
    val_ndcg = None
    if weights is None:
        weights, val_ndcg = select([scores(m, data.val, exclude=False) for m in members], data.val, method=method, k=k)
    ens = RecEnsemble(members, method, weights).eval()
    step = {"method": method, "k": k, "weights": [round(float(w), 4) for w in ens.weights],
            "members": [lineage_str(lineage_of(m)) for m in members]}
    if val_ndcg is not None:
        step[f"val_ndcg@{k}"] = round(val_ndcg, 4)
    specs = [spec_of(m) for m in members]
    if any(s is None for s in specs):  # works in memory, but cannot be saved
        return ens
    spec = {"arch": "rec-ensemble", "args": {"members": specs, "method": method, "k": k}}
    attach(ens, spec, lineage=[{"op": "rec_ensemble", "params": step}], task=data.task.to_dict())
    return check(ens, "ensemble (recommender)", data=data, fix="weights=, or leave out the member that fails alone")
