"""Stacking: a meta-learner on out-of-fold member predictions.

Every meta-training sample carries its provenance in :class:`OutOfFold`: its id
in a pool numbering the training split ``0..n_train-1`` and the validation split
``n_train..``, the fold whose models produced its features, and for every
member and fold the ids that model was trained on. ``oof.leaks()`` lists every
(sample, member) pair where a member saw the label it predicts; stacking refuses
to fit when it is not empty.

- Members trained by :func:`slimfuse.train_members` with ``folds=k``: k-fold
  out-of-fold predictions on the training split (each fold's models never saw it).
- Pretrained members: a held-out blend split of the validation data, which the
  members never trained on (members without a record of what they saw are taken
  to have seen exactly ``data.train``).

With k-fold members the meta-training rows are their out-of-fold rows plus the members' own
predictions on ``data.val`` (:func:`with_validation`).

The meta-learner (stored as tensors either way) is by default a log-linear pool
(:class:`slimfuse.fuse.combine.LogLinearPool`: one exponent per member on its
log-probabilities and a bias per class, the pull of the exponents toward 1/K chosen by
cross-validated NLL), or scikit-learn's ``LogisticRegressionCV`` on the probabilities
(regularization chosen by cross-validation) converted to a ``torch.nn.Linear``, or a small
MLP trained with :func:`slimfuse.fit`. On the benchmark's members the logistic regression
(K x C x C weights) lost to the best member on test NLL; the pool (K + C) did not
(BENCHMARKS.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from ..data import Split, Splits, Task
from ..errors import ConfigError
from ..train import fit
from .combine import meta_module


@dataclass
class OutOfFold:
    """Meta-training set with provenance (see the module docstring)."""

    features: np.ndarray  # (N, K, C) member probabilities
    y: np.ndarray  # (N,)
    sample_ids: np.ndarray  # (N,) ids in the train+val pool
    fold: np.ndarray  # (N,) index of the fold whose models produced the row
    trained_on: list[list[np.ndarray]]  # [member][fold] -> pool ids that model was trained on
    scheme: str  # "k-fold" or "blend"

    def leaks(self) -> list[tuple[int, int]]:
        """(sample id, member) pairs whose features come from a model that saw that sample."""
        out = []
        for k, per_fold in enumerate(self.trained_on):
            for f, seen in enumerate(per_fold):
                rows = self.fold == f
                hit = np.isin(self.sample_ids[rows], seen)
                out += [(int(i), k) for i in self.sample_ids[rows][hit]]
        return out


def blend_oof(members, data: Splits, *, trained_on=None, blend: float = 1.0, seed: int = 0,
              device=None) -> OutOfFold:
    """Meta-training set for pretrained members: their predictions on (a fraction of) ``data.val`` (run on
    ``device``)."""
    from .api import member_probas

    if not 0 < blend <= 1:
        raise ConfigError(f"blend must be a fraction in (0, 1], got {blend}")
    n_train, n_val = len(data.train), len(data.val)
    idx = np.arange(n_val)
    if blend < 1:
        idx, _ = train_test_split(idx, train_size=blend, random_state=seed, stratify=data.val.y.numpy())
        idx = np.sort(idx)
    split = data.val.subset(idx)
    if trained_on is None:
        trained_on = [np.arange(n_train)] * len(members)
    return OutOfFold(
        features=member_probas(members, split, device).transpose(1, 0, 2),
        y=split.y.numpy(),
        sample_ids=n_train + idx,
        fold=np.zeros(len(idx), dtype=np.int64),
        trained_on=[[np.asarray(t)] for t in trained_on],
        scheme="blend",
    )


def with_validation(oof: OutOfFold, members, data: Splits, trained_on, device=None) -> OutOfFold:
    """``oof`` plus the members' own predictions on ``data.val`` as one more fold: rows the members never
    trained on, with the confidence of the members the meta-learner is applied to (the fold models that
    made ``oof`` saw less data and are less sure)."""
    from .api import member_probas

    n_train, n_val = len(data.train), len(data.val)
    folds = int(oof.fold.max()) + 1 if len(oof.fold) else 0
    seen = [np.arange(n_train)] * len(members) if trained_on is None else trained_on
    return OutOfFold(
        features=np.concatenate([oof.features, member_probas(members, data.val, device).transpose(1, 0, 2)]),
        y=np.concatenate([oof.y, data.val.y.numpy()]),
        sample_ids=np.concatenate([oof.sample_ids, n_train + np.arange(n_val)]),
        fold=np.concatenate([oof.fold, np.full(n_val, folds, dtype=oof.fold.dtype)]),
        trained_on=[[*per_fold, np.asarray(s)] for per_fold, s in zip(oof.trained_on, seen, strict=True)],
        scheme=oof.scheme,
    )


def _meta_cv(y: np.ndarray, seed: int):
    """The 5-fold split a meta-learner's regularization is chosen on: stratified when every class has
    two rows."""
    smallest = np.bincount(y)[np.unique(y)].min()
    return (StratifiedKFold(min(5, smallest), shuffle=True, random_state=seed) if smallest >= 2
            else KFold(min(5, len(y)), shuffle=True, random_state=seed))


LOGLINEAR_L2 = (1e-3, 1e-2, 1e-1)  # the pull of a loglinear meta-learner's exponents toward 1/K, chosen by CV


def _pooled(logp: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The pool's log-probabilities (N, C) from member log-probabilities (N, K, C)."""
    from scipy.special import log_softmax

    return log_softmax(np.einsum("nkc,k->nc", logp, a) + b, axis=1)


def _fit_loglinear(logp: np.ndarray, y: np.ndarray, classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Exponents (K,) and class biases (C,) minimizing mean NLL + l2 * |a - 1/K|^2 (L-BFGS, exact gradient)."""
    from scipy.optimize import minimize

    n, k, _ = logp.shape
    rows = np.arange(n)

    def loss(t):
        a, b = t[:k], t[k:]
        z = _pooled(logp, a, b)
        g = np.exp(z)
        g[rows, y] -= 1.0
        g /= n  # d(mean NLL) / d(logits)
        pull = a - 1.0 / k
        value = -z[rows, y].mean() + l2 * pull @ pull
        return value, np.concatenate([np.einsum("nkc,nc->k", logp, g) + 2 * l2 * pull, g.sum(0)])

    start = np.concatenate([np.full(k, 1.0 / k), np.zeros(classes)])
    t = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": 500}).x
    return t[:k], t[k:]


def _loglinear_meta(oof: OutOfFold, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The pull chosen by 5-fold cross-validated NLL on the meta-training rows, then a fit on all of them."""
    from .combine import LogLinearPool

    logp = np.log(np.clip(oof.features.astype(np.float64), LogLinearPool.FLOOR, 1.0))
    y = oof.y.astype(np.int64)
    scores = []
    for l2 in LOGLINEAR_L2:
        held = []
        for tr, va in _meta_cv(y, seed).split(logp, y):
            a, b = _fit_loglinear(logp[tr], y[tr], classes, l2)
            held.append(-_pooled(logp[va], a, b)[np.arange(len(va)), y[va]])
        scores.append(np.concatenate(held).mean())
    l2 = LOGLINEAR_L2[int(np.argmin(scores))]
    a, b = _fit_loglinear(logp, y, classes, l2)
    return a, b, l2


def fit_meta(oof: OutOfFold, classes: int, *, kind: str = "loglinear", data: Splits | None = None,
             hidden: list[int] | None = None, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Fit the meta-learner on ``oof``; returns (module, spec of its architecture)."""
    leaks = oof.leaks()
    if leaks:
        raise ConfigError(
            f"stacking would leak labels: {len(leaks)} meta-features come from members that saw their "
            f"sample (first: sample {leaks[0][0]}, member {leaks[0][1]})"
        )
    n, k, c = oof.features.shape
    x = oof.features.reshape(n, k * c).astype(np.float32)
    if len(np.unique(oof.y)) < 2:
        raise ConfigError("stacking needs at least two classes among the meta-training samples")
    spec = {"kind": kind, "features": k * c}
    net = meta_module(kind, k * c, classes, hidden)
    if kind == "loglinear":
        if c != classes:
            raise ConfigError(f"the meta-features hold {c} classes per member, the ensemble predicts {classes}")
        a, b, l2 = _loglinear_meta(oof, classes, seed)
        with torch.no_grad():
            net.weight.copy_(torch.from_numpy(a).float())
            net.bias.copy_(torch.from_numpy(b).float())
        spec["l2"] = l2
        return net, spec
    if kind == "linear":
        cv = _meta_cv(oof.y, seed)
        # standardized features (folded back into the Linear below) keep lbfgs well conditioned
        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 1e-6, std, 1.0)
        lr = LogisticRegressionCV(Cs=8, cv=cv, max_iter=2000, scoring="neg_log_loss", random_state=seed)
        with warnings.catch_warnings():  # scikit-learn 1.9 announces 1.10's new defaults; we use neither
            warnings.simplefilter("ignore", FutureWarning)
            lr.fit((x - mean) / std, oof.y)
        weight = np.zeros((classes, k * c), dtype=np.float32)
        bias = np.full(classes, -30.0, dtype=np.float32)  # a class never seen in training stays improbable
        coef = lr.coef_ / std
        intercept = lr.intercept_ - coef @ mean
        if len(lr.classes_) == 2:  # binary: scikit-learn keeps one row for the positive class
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        weight[lr.classes_] = coef
        bias[lr.classes_] = intercept
        with torch.no_grad():
            net.weight.copy_(torch.from_numpy(weight))
            net.bias.copy_(torch.from_numpy(bias))
        spec["C"] = float(lr.C_[0])
        return net, spec
    spec["hidden"] = list(hidden or [32])
    # early stopping on a stratified fifth of the meta-training rows
    tr, va = train_test_split(np.arange(n), test_size=0.2, random_state=seed, stratify=_stratify(oof.y))
    task = Task("stacking-meta", "classification", classes, (k * c,))
    xt, yt = torch.from_numpy(x), torch.from_numpy(oof.y)
    meta_data = Splits(Split(xt[tr], yt[tr]), Split(xt[va], yt[va]), Split(xt[va], yt[va]), task)
    torch.manual_seed(seed)
    net = fit(net, meta_data, epochs=60, lr=3e-3, weight_decay=1e-4, patience=8, seed=seed, op=None,
              progress=False)
    return net, spec


def _stratify(y: np.ndarray):
    counts = np.bincount(y)
    return y if counts[counts > 0].min() >= 2 else None
