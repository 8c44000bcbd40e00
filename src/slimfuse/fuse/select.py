"""Ensemble weights from cached prediction arrays, apart from the models.

:func:`caruana` is Caruana et al.'s greedy forward selection with replacement
(as in AutoGluon): start empty, repeatedly add the member whose addition gives
the lowest validation loss, and keep the best point of the trajectory. Because
the first step picks the best single member, the result is never worse than the
best member on the data it was fitted on. :func:`refine` then optionally
minimizes validation NLL over the simplex, starting from those weights, and
keeps the result only if it is no worse.

On a small validation split those weights overfit it. :func:`bagged` runs the
selection on bootstrap resamples of the validation rows and averages the weights
(Caruana et al. 2006's bagged selection); ``refine(..., prior=s)`` adds a pull of
``s`` pseudo-samples toward uniform weights (KL(uniform || w)). :func:`check`
estimates, by cross-validation over the validation rows, whether the fitted
combination beats the best single member on data it was not fitted on: a one-sided
95% paired test of the out-of-fold difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from .. import stats
from ..errors import ConfigError, DataError

EPS = 1e-12


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of probabilities (N, C) for labels (N,)."""
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], EPS, None)).mean())


def error(proba: np.ndarray, y: np.ndarray) -> float:
    return float((proba.argmax(1) != y).mean())


METRICS = {"nll": nll, "error": error}


@dataclass
class Selection:
    """Weights (K,) summing to 1, the loss trajectory and the chosen round."""

    weights: np.ndarray
    metric: str
    loss: float
    trajectory: list[float] = field(default_factory=list)
    picks: list[int] = field(default_factory=list)
    best_round: int = 0
    refined: bool = False
    temperature: float = 1.0  # the combined probabilities are softmax(log p / temperature)


def combined(probas: np.ndarray, weights: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The ensemble's probabilities (N, C): the weighted mean of member probabilities, tempered."""
    p = np.einsum("k,knc->nc", weights, probas)
    if temperature == 1.0:
        return p
    z = np.log(np.clip(p, EPS, None)) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def temper(probas, y, selection: Selection, *, bounds: tuple[float, float] = (0.05, 20.0)) -> Selection:
    """Fit one temperature of the combined probabilities by validation NLL (one scalar: members
    that are each under- or over-confident stay so when averaged; this corrects it)."""
    from scipy.optimize import minimize_scalar

    probas, y = _check(probas, y)
    w = selection.weights
    res = minimize_scalar(lambda t: nll(combined(probas, w, float(np.exp(t))), y),
                          bounds=tuple(np.log(bounds)), method="bounded")
    t = float(np.exp(res.x))
    loss = nll(combined(probas, w, t), y)
    if not np.isfinite(loss) or loss > nll(combined(probas, w), y):
        return selection
    return Selection(w, selection.metric, loss if selection.metric == "nll" else selection.loss,
                     selection.trajectory, selection.picks, selection.best_round, selection.refined, t)


def _check(probas: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probas = np.asarray(probas, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if probas.ndim != 3:
        raise DataError(f"member predictions must have shape (members, samples, classes), got {probas.shape}")
    if len(y) == 0:
        raise DataError("no samples to fit ensemble weights on (is the validation split empty?)")
    if probas.shape[1] != len(y):
        raise DataError(f"{probas.shape[1]} predictions per member but {len(y)} labels")
    if (y < 0).any() or (y >= probas.shape[2]).any():
        raise DataError(f"labels must be in 0..{probas.shape[2] - 1}")
    return probas, y


def caruana(probas, y, *, rounds: int = 25, metric: str = "nll") -> Selection:
    """Greedy forward selection with replacement over member probabilities (K, N, C)."""
    probas, y = _check(probas, y)
    if metric not in METRICS:
        raise ConfigError(f"unknown selection metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    loss_fn = METRICS[metric]
    k = len(probas)
    total = np.zeros(probas.shape[1:])
    counts = np.zeros(k, dtype=np.int64)
    trajectory, picks = [], []
    best = (np.inf, 0, None)
    for r in range(1, rounds + 1):
        scores = [loss_fn((total + probas[j]) / r, y) for j in range(k)]
        j = int(np.argmin(scores))  # ties: the lowest index
        total += probas[j]
        counts[j] += 1
        trajectory.append(scores[j])
        picks.append(j)
        if scores[j] < best[0]:
            best = (scores[j], r, counts.copy())
    loss, best_round, best_counts = best
    return Selection(best_counts / best_counts.sum(), metric, loss, trajectory, picks, best_round)


def bagged(probas, y, *, bags: int = 20, rounds: int = 25, metric: str = "nll", seed: int = 0) -> Selection:
    """Caruana selection on ``bags`` bootstrap resamples of the rows; the mean of their weights.

    ``loss`` and ``trajectory`` are measured on all rows for the averaged weights."""
    probas, y = _check(probas, y)
    if isinstance(bags, bool) or not isinstance(bags, int) or bags < 1:
        raise ConfigError(f"bags must be a positive integer, got {bags!r}")
    rng = np.random.default_rng(seed)
    w = np.zeros(len(probas))
    for _ in range(bags):
        idx = rng.integers(0, len(y), size=len(y))
        w += caruana(probas[:, idx], y[idx], rounds=rounds, metric=metric).weights
    w /= w.sum()
    loss = METRICS[metric]((w[:, None, None] * probas).sum(0), y)
    return Selection(w, metric, loss, [loss], [], rounds)


def refine(probas, y, selection: Selection, *, maxiter: int = 200, prior: float = 0.0) -> Selection:
    """Minimize validation NLL over the simplex from ``selection``'s weights.

    ``prior=0``: keep the result only if no worse. ``prior > 0`` adds ``prior / N * KL(uniform || w)``
    (a pull of ``prior`` pseudo-samples toward equal weights), and keeps the penalized optimum."""
    probas, y = _check(probas, y)
    if not np.isfinite(prior) or prior < 0:
        raise ConfigError(f"prior must be a non-negative number of pseudo-samples, got {prior!r}")
    picked = probas[np.arange(len(probas))[:, None], np.arange(len(y)), y].T  # (N, K): p_k(y_i)
    w0 = np.clip(selection.weights, 1e-6, None)
    k, scale = len(probas), prior / len(y)

    def objective(theta):
        w = np.exp(theta - theta.max())
        w /= w.sum()
        p = np.clip(picked @ w, EPS, None)
        loss = -np.log(p).mean() - scale * np.log(np.clip(w, EPS, None)).mean()
        # d loss / d w_k = -mean(picked_k / p); chain rule through the softmax; the prior's
        # -(1/K) sum log w_k has gradient w - 1/K in theta
        g_w = -(picked / p[:, None]).mean(0)
        return loss, w * (g_w - (w * g_w).sum()) + scale * (w - 1.0 / k)

    res = minimize(objective, np.log(w0), jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
    w = np.exp(res.x - res.x.max())
    w /= w.sum()
    w[w < 1e-4] = 0.0  # members that carry no weight are dropped from the ensemble
    w /= w.sum()
    start = nll((selection.weights[:, None, None] * probas).sum(0), y)
    new = nll((w[:, None, None] * probas).sum(0), y)
    if not np.isfinite(new) or (prior == 0 and new > start):
        return selection
    return Selection(w, "nll", new, selection.trajectory, selection.picks, selection.best_round, refined=True)


def select(probas, y, *, rounds: int = 25, metric: str = "nll", bags: int = 0, refine_nll: bool = False,
           prior: float = 0.0, temperature: bool = False, seed: int = 0) -> Selection:
    """Caruana (``bags=0``) or bagged Caruana selection, then optionally :func:`refine` and :func:`temper`."""
    sel = bagged(probas, y, bags=bags, rounds=rounds, metric=metric, seed=seed) if bags else \
        caruana(probas, y, rounds=rounds, metric=metric)
    sel = refine(probas, y, sel, prior=prior) if refine_nll else sel
    return temper(probas, y, sel) if temperature else sel


@dataclass
class Check:
    """Does the combination beat the best member out of sample? (:func:`check`)"""

    beats: bool
    best: int  # the best member on all rows (by ``metric``)
    nll: stats.Interval  # out-of-fold ensemble NLL - best member NLL (negative: the ensemble is better)
    accuracy: stats.Interval  # out-of-fold ensemble accuracy - best member accuracy
    folds: int

    def to_dict(self) -> dict:
        return {"beats_best_member": self.beats, "best_member": self.best, "folds": self.folds,
                "nll_diff": self.nll.to_dict(), "accuracy_diff": self.accuracy.to_dict()}


def check(probas, y, fit, *, metric: str = "nll", folds: int = 5, seed: int = 0, level: float = 0.90) -> Check:
    """Cross-validate ``fit(probas, y) -> Selection`` over the rows: out-of-fold combined
    probabilities vs those of the member best on the same training folds. ``beats`` when the paired
    ``level`` interval of the difference on ``metric`` (NLL or error) lies wholly on the ensemble's
    side (the default 90% two-sided interval is the one-sided 95% test of the directional claim
    "beats") and its accuracy is not worse beyond noise."""
    from sklearn.model_selection import KFold, StratifiedKFold

    probas, y = _check(probas, y)
    loss_fn = METRICS[metric]
    best = int(np.argmin([loss_fn(p, y) for p in probas]))
    counts = np.bincount(y)
    folds = max(2, min(folds, len(y)))
    cv = (StratifiedKFold(folds, shuffle=True, random_state=seed) if counts[counts > 0].min() >= folds
          else KFold(folds, shuffle=True, random_state=seed))
    # both procedures out of fold: the combination fitted on the other folds, and the member that is
    # best on the other folds (picking it on all rows would hand it an in-sample advantage)
    oof, oof_best = np.zeros(probas.shape[1:]), np.zeros(probas.shape[1:])
    for tr, te in cv.split(np.zeros(len(y)), y):
        sel = fit(probas[:, tr], y[tr])
        oof[te] = combined(probas[:, te], sel.weights, sel.temperature)
        oof_best[te] = probas[int(np.argmin([loss_fn(p[tr], y[tr]) for p in probas])), te]
    ens, one = (stats.per_sample(np.log(np.clip(oof, EPS, None)), y),
                stats.per_sample(np.log(np.clip(oof_best, EPS, None)), y))
    d_nll = stats.paired_bootstrap(ens["nll"], one["nll"], level=level, seed=seed)
    d_acc = stats.paired_bootstrap(ens["correct"], one["correct"], level=level, seed=seed)
    gain = d_nll.hi < 0 if metric == "nll" else d_acc.lo > 0
    return Check(bool(gain and d_acc.hi >= 0), best, d_nll, d_acc, folds)
