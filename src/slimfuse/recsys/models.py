"""Recommenders whose size lives in embedding tables: matrix factorization and a two-tower model.

Called on a batch of user ids (int64), a recommender returns scores over every item,
``(batch, n_items)``, so ``fit`` (softmax cross-entropy, or :func:`bpr_loss`), ``predict`` and
``measure`` treat it like a classifier over items. Both tables are submodules named ``users`` and
``items``; they are ``nn.Embedding`` or, once quantized, :class:`~slimfuse.recsys.compress.QEmbedding`,
which offers the same ``table(ids)`` and ``table.weight``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..models import zoo
from ..models.spec import attach
from ..train import Batch


def check_ids(ids: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """``ids`` as int64, or a DataError naming the first id outside ``0..n-1``."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise DataError(f"{what} ids must be integers, got dtype {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        bad = int(ids[(ids < 0) | (ids >= n)][0])
        raise DataError(f"{what} id {bad} is outside the table ({n} {what}s, ids 0..{n - 1})")
    return ids.long()


def _positive(name: str, **values) -> None:
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}: {key} must be a positive integer, got {v!r}")


def _table(n: int, dim: int) -> nn.Embedding:
    emb = nn.Embedding(n, dim)
    nn.init.normal_(emb.weight, std=0.1)
    return emb


class MF(nn.Module):
    """Matrix factorization: ``score(u, i) = <users[u], items[i]> + bias[i]``."""

    def __init__(self, n_users: int, n_items: int, dim: int):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.users = _table(n_users, dim)
        self.items = _table(n_items, dim)
        self.bias = nn.Parameter(torch.zeros(n_items))

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        u = self.users(check_ids(users, self.n_users, "user"))
        return u @ self.items.weight.T + self.bias


def _tower(dim: int, hidden: Sequence[int], out: int) -> nn.Sequential:
    layers, width = [], dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, out))


class TwoTower(nn.Module):
    """Two towers (embedding -> MLP) whose outputs' dot product is the score."""

    def __init__(self, n_users: int, n_items: int, dim: int, hidden: Sequence[int], out: int):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.users = _table(n_users, dim)
        self.items = _table(n_items, dim)
        self.user_tower = _tower(dim, hidden, out)
        self.item_tower = _tower(dim, hidden, out)
        self.register_buffer("all_items", torch.arange(n_items), persistent=False)

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        u = self.user_tower(self.users(check_ids(users, self.n_users, "user")))
        # a lookup of every row (not .weight itself): FLOP counting cannot follow a leaf parameter
        return u @ self.item_tower(self.items(self.all_items)).T


@zoo.register("mf")
def mf(n_users: int, n_items: int, dim: int = 64) -> nn.Module:
    """Matrix factorization with an item bias (train with ``recsys.fit(model, data, loss="bpr")``)."""
    _positive("mf", n_users=n_users, n_items=n_items, dim=dim)
    args = {"n_users": n_users, "n_items": n_items, "dim": dim}
    return attach(MF(n_users, n_items, dim), {"arch": "mf", "args": args})


@zoo.register("two-tower")
def two_tower(n_users: int, n_items: int, dim: int = 64, hidden: Sequence[int] = (64,), out: int = 32) -> nn.Module:
    """User and item towers (embedding table, then an MLP with ``hidden`` widths, then ``out``)."""
    hidden = list(hidden)
    widths = {f"hidden[{i}]": h for i, h in enumerate(hidden)}
    _positive("two-tower", n_users=n_users, n_items=n_items, dim=dim, out=out, **widths)
    args = {"n_users": n_users, "n_items": n_items, "dim": dim, "hidden": hidden, "out": out}
    return attach(TwoTower(n_users, n_items, dim, hidden, out), {"arch": "two-tower", "args": args})


def bpr_loss(n_items: int, *, negatives: int = 4, seed: int = 0):
    """Bayesian personalized ranking as a ``fit`` loss hook: ``-log sigmoid(s_pos - s_neg)``,
    ``negatives`` items drawn uniformly per positive (seeded)."""
    gen = torch.Generator().manual_seed(seed)

    def loss(scores: torch.Tensor, batch: Batch) -> torch.Tensor:
        pos = scores.gather(1, batch.y[:, None])
        neg = scores.gather(1, torch.randint(n_items, (len(batch.y), negatives), generator=gen))
        return -F.logsigmoid(pos - neg).mean()

    return loss


def fit(model: nn.Module, data, *, loss: str = "softmax", negatives: int = 4, epochs: int = 15,
        batch_size: int = 2048, lr: float = 1e-2, weight_decay: float | None = None, **kwargs) -> nn.Module:
    """Train a recommender on ``data.train`` (one row per interaction) through ``slimfuse.fit``.

    ``loss``: ``softmax`` (cross-entropy over all items) or ``bpr`` (pairwise, :func:`bpr_loss`,
    ``negatives`` uniform negatives per positive). ``weight_decay`` defaults to 1e-4 for matrix
    factorization with the softmax loss and 0 otherwise: Adam's L2 term on rows that get no other
    gradient in a step (BPR's unsampled items, a two-tower's absent users) collapsed those models to
    popularity-level NDCG (BENCHMARKS.md). Other keyword arguments (``seed``, ``schedule``, ``op``
    ...) go to ``fit``.
    """
    from ..train import fit as train_fit

    if loss == "bpr":
        hook = bpr_loss(data.n_items, negatives=negatives, seed=kwargs.get("seed", 0))
    elif loss == "softmax":
        hook = None
    else:
        raise ConfigError(f"unknown recommender loss {loss!r}; choose bpr or softmax")
    if weight_decay is None:
        weight_decay = 1e-4 if loss == "softmax" and isinstance(model, MF) else 0.0
    return train_fit(model, data, loss=hook, epochs=epochs, batch_size=batch_size, lr=lr,
                     weight_decay=weight_decay, **kwargs)
