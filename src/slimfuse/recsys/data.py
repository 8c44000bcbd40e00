"""Implicit-feedback data: a seeded synthetic generator, a CSV reader, leave-one-out splits.

:class:`Interactions` is a :class:`~slimfuse.data.Splits`, so ``fit`` and ``measure`` take it
unchanged: ``train`` holds one row per training interaction (x = user id, y = item id), ``val`` and
``test`` are :class:`HeldOut` splits with one held-out item per user (x = user id, y = the item)
that also carry, per row, the items the user interacted with before it, which ranking excludes.
Each user's last interaction (by timestamp) is the test item, the one before it the validation
item, the rest are training interactions.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..data import Split, Splits, Task
from ..errors import ConfigError, DataError


@dataclass(frozen=True)
class HeldOut(Split):
    """One held-out item per row; ``seen_items[seen_ptr[i]:seen_ptr[i + 1]]`` are row i's excluded items."""

    seen_ptr: torch.Tensor
    seen_items: torch.Tensor

    def seen(self, i: int) -> torch.Tensor:
        return self.seen_items[int(self.seen_ptr[i]) : int(self.seen_ptr[i + 1])]

    def subset(self, index) -> HeldOut:
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        counts = (self.seen_ptr[1:] - self.seen_ptr[:-1])[index]
        starts = self.seen_ptr[:-1][index]
        ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        offsets = torch.arange(int(ptr[-1])) - torch.repeat_interleave(ptr[:-1], counts)
        items = self.seen_items[torch.repeat_interleave(starts, counts) + offsets]
        return HeldOut(self.x[index], self.y[index], ptr, items)

    def exclusion_mask(self, n_items: int, rows: slice | None = None) -> torch.Tensor:
        """Boolean (rows, n_items): True where an item is excluded from row's ranking."""
        lo, hi = (0, len(self)) if rows is None else (rows.start or 0, min(rows.stop, len(self)))
        ptr = self.seen_ptr[lo : hi + 1]
        counts = ptr[1:] - ptr[:-1]
        mask = torch.zeros(hi - lo, n_items, dtype=torch.bool)
        row_of = torch.repeat_interleave(torch.arange(hi - lo), counts)
        mask[row_of, self.seen_items[int(ptr[0]) : int(ptr[-1])]] = True
        return mask


@dataclass(frozen=True)
class Interactions(Splits):
    """Leave-one-out splits of implicit feedback; ``user_ids`` / ``item_ids`` map back to the file's ids."""

    n_users: int
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None

    @property
    def n_items(self) -> int:
        return self.task.num_classes

    def train_mask(self, users: torch.Tensor) -> torch.Tensor:
        """Boolean (len(users), n_items): the training interactions of ``users``."""
        ptr, items = self._train_csr
        counts = (ptr[1:] - ptr[:-1])[users]
        starts = ptr[:-1][users]
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        mask = torch.zeros(len(users), self.n_items, dtype=torch.bool)
        mask[torch.repeat_interleave(torch.arange(len(users)), counts),
             items[torch.repeat_interleave(starts, counts) + offsets]] = True
        return mask

    @cached_property
    def _train_csr(self):
        order = torch.argsort(self.train.x, stable=True)
        counts = torch.bincount(self.train.x, minlength=self.n_users)
        return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]), self.train.y[order]

    def describe(self) -> str:
        n = len(self.train) + len(self.val) + len(self.test)
        density = n / (self.n_users * self.n_items)
        return (f"{self.task.name}: {self.n_users:,} users x {self.n_items:,} items, {n:,} interactions "
                f"(density {density:.2%}); leave-one-out: {len(self.train):,} train, one validation and "
                "one test item per user")


def leave_one_out(users, items, times, *, n_users: int, n_items: int, name: str,
                  user_ids=None, item_ids=None) -> Interactions:
    """Split interactions per user by time: last -> test, second last -> validation, rest -> train.

    Every user needs at least 3 interactions; ties in time keep the given order.
    """
    users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
    order = np.lexsort((np.arange(len(users)), np.asarray(times), users))
    users, items = users[order], items[order]
    counts = np.bincount(users, minlength=n_users)
    if (counts < 3).any():
        short = np.flatnonzero(counts < 3)
        raise DataError(
            f"{name}: {len(short)} user(s) have fewer than 3 interactions (first: "
            f"{_ids(short, user_ids)}); leave-one-out needs at least 3 per user (training, validation, test)"
        )
    end = np.cumsum(counts)
    pos = np.arange(len(users)) - np.repeat(end - counts, counts)  # position within the user's history
    last = pos == np.repeat(counts - 1, counts)
    second = pos == np.repeat(counts - 2, counts)
    train = ~(last | second)
    t = torch.from_numpy

    def held_out(rows, seen_rows, seen_counts):
        ptr = np.concatenate([[0], np.cumsum(seen_counts)])
        return HeldOut(t(users[rows].copy()), t(items[rows].copy()), t(ptr), t(items[seen_rows].copy()))

    task = Task(name, "recommendation", int(n_items), ())
    return Interactions(
        train=Split(t(users[train].copy()), t(items[train].copy())),
        val=held_out(second, train, counts - 2),
        test=held_out(last, ~last, counts - 1),
        task=task,
        n_users=int(n_users),
        user_ids=user_ids,
        item_ids=item_ids,
    )


def _ids(idx, ids, limit: int = 5) -> str:
    shown = [str(ids[i] if ids is not None else i) for i in idx[:limit]]
    return ", ".join(shown) + (", ..." if len(idx) > limit else "")


def synthetic(n_users: int = 2000, n_items: int = 1500, *, dim: int = 16, interactions: int = 30,
              popularity: float = 0.7, sharpness: float = 3.0, seed: int = 0) -> Interactions:
    """A seeded implicit-feedback data set with latent structure and power-law item popularity.

    Users and items get ``dim``-dimensional Gaussian factors; item ``i``'s popularity is
    ``rank_i ** -popularity`` (Zipf); user ``u`` picks ``n_u`` distinct items (log-normal around
    ``interactions``, at least 5) with probabilities proportional to
    ``exp(sharpness * <u, i> / sqrt(dim)) * popularity_i``, in random order (the "timestamps").
    The same seed gives identical arrays.
    """
    for key, v in (("n_users", n_users), ("n_items", n_items), ("dim", dim), ("interactions", interactions)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"synthetic: {key} must be a positive integer, got {v!r}")
    if n_items < 10 or interactions >= n_items // 2:
        raise ConfigError(f"synthetic: need n_items >= 10 and interactions < n_items / 2, "
                          f"got {n_items} and {interactions}")
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n_users, dim))
    v = rng.standard_normal((n_items, dim))
    log_pop = -popularity * np.log1p(rng.permutation(n_items))
    counts = np.clip(np.round(rng.lognormal(math.log(interactions), 0.5, n_users)), 5, n_items // 2).astype(np.int64)
    users, items = [], []
    for lo in range(0, n_users, 512):  # Gumbel top-k: sampling without replacement, in chunks
        logits = sharpness * (u[lo : lo + 512] @ v.T) / math.sqrt(dim) + log_pop
        keys = logits + rng.gumbel(size=logits.shape)
        for r, row in enumerate(keys):
            n = counts[lo + r]
            chosen = np.argpartition(-row, n)[:n]
            users.append(np.full(n, lo + r))
            items.append(rng.permutation(chosen))
    users, items = np.concatenate(users), np.concatenate(items)
    return leave_one_out(users, items, np.arange(len(users)), n_users=n_users, n_items=n_items,
                         name=f"synthetic-{n_users}x{n_items}-seed{seed}")


def read_interactions(path: str | Path, *, min_rating: float | None = None, drop_short_users: bool = False,
                      seed: int = 0) -> Interactions:
    """Read a ``user,item[,rating,timestamp]`` CSV (with a header) into leave-one-out splits.

    Ids are integers (any range; they are renumbered, ``user_ids`` / ``item_ids`` map back).
    ``rating``: with ``min_rating``, rows rated below it are dropped. ``timestamp`` orders each
    user's history (without it, a seeded random order); repeated (user, item) pairs keep the latest.
    Users with fewer than 3 interactions raise a DataError, or are dropped with ``drop_short_users``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r and any(c.strip() for c in r)]
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise DataError(f"{path}: file is empty")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("user", "item") if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected a header "
                        f"user,item[,rating,timestamp] (found: {', '.join(header)})")
    if min_rating is not None and "rating" not in header:
        raise DataError(f"{path}: min_rating needs a rating column (found: {', '.join(header)})")
    if len(rows) < 2:
        raise DataError(f"{path}: header but no interactions")
    cols = {c: header.index(c) for c in ("user", "item", "rating", "timestamp") if c in header}
    data = {c: [] for c in cols}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {n} has {len(row)} fields, header has {len(header)}")
        for c, i in cols.items():
            cell = row[i].strip()
            try:
                value = int(cell) if c in ("user", "item") else float(cell)
            except ValueError:
                kind = "an integer id" if c in ("user", "item") else "a number"
                raise DataError(f"{path}: line {n}, column {c!r}: {cell!r} is not {kind}") from None
            if c not in ("user", "item") and not math.isfinite(value):
                raise DataError(f"{path}: line {n}, column {c!r}: {cell!r} is NaN or infinite")
            data[c].append(value)
    users, items = np.asarray(data["user"], dtype=np.int64), np.asarray(data["item"], dtype=np.int64)
    keep = np.ones(len(users), dtype=bool)
    if min_rating is not None:
        keep &= np.asarray(data["rating"]) >= min_rating
    if "timestamp" in cols:
        times = np.asarray(data["timestamp"], dtype=np.float64)
    else:
        times = np.random.default_rng(seed).permutation(len(users)).astype(np.float64)
    users, items, times = users[keep], items[keep], times[keep]
    # a repeated (user, item) pair keeps its latest interaction
    order = np.lexsort((np.arange(len(users)), times, items, users))[::-1]
    _, first = np.unique(np.stack([users[order], items[order]], 1), axis=0, return_index=True)
    rows_kept = np.sort(order[first])
    users, items, times = users[rows_kept], items[rows_kept], times[rows_kept]
    if drop_short_users:
        _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
        long_enough = counts[inverse] >= 3
        users, items, times = users[long_enough], items[long_enough], times[long_enough]
    if len(users) == 0:
        raise DataError(f"{path}: no interactions left (min_rating={min_rating}, drop_short_users={drop_short_users})")
    user_ids, u = np.unique(users, return_inverse=True)
    item_ids, i = np.unique(items, return_inverse=True)
    if len(item_ids) < 2:
        raise DataError(f"{path}: only {len(item_ids)} distinct item; ranking needs at least 2")
    try:
        return leave_one_out(u, i, times, n_users=len(user_ids), n_items=len(item_ids), name=path.stem,
                             user_ids=user_ids, item_ids=item_ids)
    except DataError as e:
        raise DataError(f"{path}: {str(e).split(': ', 1)[1]}; pass drop_short_users=True to drop them") from None
