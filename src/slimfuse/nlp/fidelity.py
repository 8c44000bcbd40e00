"""Fidelity of an embedding model to a reference (its fp32 source): no labels needed.

- ``mean_cosine`` / ``min_cosine``: cosine between each sentence's embedding and the reference's;
- ``topk_agreement``: the share of each sentence's ``k`` nearest neighbours (by cosine, itself
  excluded) that the reference also ranks among its ``k`` nearest;
- ``spearman``: rank correlation of all pairwise similarities with the reference's;
- ``topic_knn_accuracy``: a cheap downstream check where the split has topic labels: the share of
  sentences whose nearest neighbour has the same topic.

``fidelity_score(reference)`` returns the ``score`` hook of :func:`slimfuse.measure`; the
reference embeddings are computed once per split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Split
from ..errors import ConfigError, DataError
from ..measure import register_column
from ..train import predict

KEYS = ("mean_cosine", "min_cosine", "topk_agreement", "spearman", "topic_knn_accuracy")
for _key, _label in (("mean_cosine", "mean cos"), ("min_cosine", "min cos"), ("topk_agreement", "top-k agree"),
                     ("spearman", "Spearman"), ("topic_knn_accuracy", "topic 1-NN acc")):
    register_column(_key, _label)


def embed(model: nn.Module, x: torch.Tensor, *, batch: int = 32) -> torch.Tensor:
    """Embeddings of token ids ``x`` (N x length) in batches of ``batch``, as float32; each batch is
    cut to its longest sentence (padding columns change nothing but the cost)."""
    if len(x) == 0:
        raise DataError("no sentences to embed")
    outs = []
    for i in range(0, len(x), batch):
        b = x[i:i + batch]
        if not b.is_floating_point() and b.ndim == 2:
            used = (b != 0).any(0).nonzero()
            b = b[:, : int(used.max()) + 1 if len(used) else 1]
        outs.append(predict(model, b, batch_size=len(b)))
    return torch.cat(outs).float()


def _ranks(v: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(v, dtype=torch.float64)
    r[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
    return r


def fidelity(reference: torch.Tensor, emb: torch.Tensor, *, k: int = 10, labels: torch.Tensor | None = None) -> dict:
    """The fidelity metrics of embeddings ``emb`` against ``reference`` (both N x dim, same sentences)."""
    if reference.shape != emb.shape:
        raise DataError(f"embeddings of shape {tuple(emb.shape)} cannot be compared with {tuple(reference.shape)}")
    n = len(reference)
    if n < 2:
        raise DataError("fidelity needs at least 2 sentences")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    k = min(k, n - 1)
    ref, got = F.normalize(reference.double(), dim=1), F.normalize(emb.double(), dim=1)
    cos = (ref * got).sum(1)
    sim_ref, sim_got = ref @ ref.T, got @ got.T
    eye = torch.eye(n, dtype=torch.bool)
    nn_ref = sim_ref.masked_fill(eye, -2).topk(k, dim=1).indices
    nn_got = sim_got.masked_fill(eye, -2).topk(k, dim=1).indices
    hits = (nn_got.unsqueeze(2) == nn_ref.unsqueeze(1)).any(2).double().mean()
    upper = torch.triu_indices(n, n, offset=1)
    a, b = _ranks(sim_ref[upper[0], upper[1]]), _ranks(sim_got[upper[0], upper[1]])
    a, b = a - a.mean(), b - b.mean()
    spearman = float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))
    out = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "topk_agreement": float(hits),
           "spearman": spearman}
    if labels is not None:
        out["topic_knn_accuracy"] = float((labels[nn_got[:, 0]] == labels).double().mean())
    return out


def fidelity_score(reference: nn.Module, split: Split | None = None, *, k: int = 10,
                   batch: int = 32) -> Callable[[nn.Module, Split], dict]:
    """A ``score(model, split) -> {"mean_cosine", "min_cosine", "topk_agreement", "spearman",
    "topic_knn_accuracy"}`` for :func:`slimfuse.measure` (use ``metric="mean_cosine"``).

    The reference's embeddings are computed once per split (now, for ``split`` if given).
    """
    if not isinstance(reference, nn.Module):
        raise ConfigError(f"the reference must be a torch module, got {type(reference).__name__}")
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def reference_for(s: Split) -> torch.Tensor:
        key = (s.x.data_ptr(), tuple(s.x.shape))
        if key not in cache:  # the split is kept alive so its memory (and key) is not reused
            cache[key] = (s.x, embed(reference, s.x, batch=batch))
        return cache[key][1]

    def score(model: nn.Module, s: Split) -> dict:
        return fidelity(reference_for(s), embed(model, s.x, batch=batch), k=k, labels=s.y)

    if split is not None:
        reference_for(split)
    return score
