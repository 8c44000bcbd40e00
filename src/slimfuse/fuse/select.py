"""Ensemble weights from cached prediction arrays, apart from the models.

:func:`caruana` is Caruana et al.'s greedy forward selection with replacement
(as in AutoGluon): start empty, repeatedly add the member whose addition gives
the lowest validation loss, and keep the best point of the trajectory. Because
the first step picks the best single member, the result is never worse than the
best member on the data it was fitted on. :func:`refine` then optionally
minimizes validation NLL over the simplex, starting from those weights, and
keeps the result only if it is no worse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

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


def refine(probas, y, selection: Selection, *, maxiter: int = 200) -> Selection:
    """Minimize validation NLL over the simplex from ``selection``'s weights; keep it only if no worse."""
    probas, y = _check(probas, y)
    picked = probas[np.arange(len(probas))[:, None], np.arange(len(y)), y].T  # (N, K): p_k(y_i)
    w0 = np.clip(selection.weights, 1e-6, None)

    def objective(theta):
        w = np.exp(theta - theta.max())
        w /= w.sum()
        p = np.clip(picked @ w, EPS, None)
        loss = -np.log(p).mean()
        # d loss / d w_k = -mean(picked_k / p); chain rule through the softmax
        g_w = -(picked / p[:, None]).mean(0)
        return loss, w * (g_w - (w * g_w).sum())

    res = minimize(objective, np.log(w0), jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
    w = np.exp(res.x - res.x.max())
    w /= w.sum()
    w[w < 1e-4] = 0.0  # members that carry no weight are dropped from the ensemble
    w /= w.sum()
    start = nll((selection.weights[:, None, None] * probas).sum(0), y)
    new = nll((w[:, None, None] * probas).sum(0), y)
    if not np.isfinite(new) or new > start:
        return selection
    return Selection(w, "nll", new, selection.trajectory, selection.picks, selection.best_round, refined=True)
