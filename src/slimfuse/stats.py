"""Is a difference real? Paired intervals over test samples, McNemar's exact test, seed spread.

Every "A vs B" claim in slimfuse's reports and benchmarks is made from per-sample values of both
models on the same test samples (correctness 0/1, negative log-likelihood):

- :func:`paired_bootstrap`: the mean difference ``mean(a - b)`` and its percentile bootstrap
  interval, resampling test samples (the pairs stay together);
- :func:`mcnemar`: McNemar's exact two-sided test for two classifiers' correctness (the binomial
  test on the samples where exactly one of them is right);
- :func:`verdict`: ``"better"``, ``"worse"`` or ``"tie"`` from an interval (a tie whenever the
  interval contains 0);
- :func:`spread`: mean, standard deviation, min and max over seeds.

NumPy only, so any layer may use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """``diff = mean(a) - mean(b)`` with its ``level`` bootstrap interval ``[lo, hi]``."""

    diff: float
    lo: float
    hi: float
    level: float = 0.95
    n: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.diff:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}]"


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ConfigError(f"paired values need the same samples: got {a.size} and {b.size} values")
    if a.size == 0:
        raise ConfigError("no samples to compare")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConfigError("per-sample values must be finite")
    return a, b


def paired_bootstrap(a, b, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``a - b`` over paired samples and its percentile bootstrap interval."""
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ConfigError(f"n_boot must be an integer >= 100, got {n_boot!r}")
    a, b = _pair(a, b)
    d = a - b
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // d.size)  # bounded memory for large test sets
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, d.size, size=(min(chunk, n_boot - start), d.size))
        means[start:start + len(idx)] = d[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(d.mean()), float(lo), float(hi), level, int(d.size))


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's exact test: ``{"a_only", "b_only", "p_value"}`` (two-sided binomial, p = 1/2)."""
    a, b = _pair(correct_a, correct_b)
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ConfigError("McNemar's test needs per-sample correctness (0/1 or booleans)")
    a_only = int(((a == 1) & (b == 0)).sum())
    b_only = int(((a == 0) & (b == 1)).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    # exact: P(X <= k) for X ~ Binomial(n, 1/2), doubled; integer arithmetic keeps it exact
    p = 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"a_only": a_only, "b_only": b_only, "p_value": float(p)}


def verdict(interval: Interval, *, higher_is_better: bool = True) -> str:
    """``"better"`` when the interval lies wholly on the good side of 0, ``"worse"`` on the bad side, else ``"tie"``."""
    if interval.lo > 0:
        return "better" if higher_is_better else "worse"
    if interval.hi < 0:
        return "worse" if higher_is_better else "better"
    return "tie"


CLAIM = {"better": "met", "tie": "tie", "worse": "missed"}


def claim(interval: Interval, *, higher_is_better: bool = True) -> str:
    """A claim "A beats B" from the interval: ``"met"``, ``"tie"`` or ``"missed"``."""
    return CLAIM[verdict(interval, higher_is_better=higher_is_better)]


def spread(values) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and count over seeds."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ConfigError("no values to summarize")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def per_sample(logits, y) -> dict[str, np.ndarray]:
    """Per-sample correctness (bool) and NLL (float64) from log-probabilities or logits (N, C)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    m = z.max(1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(1, keepdims=True))
    return {"correct": z.argmax(1) == y, "nll": -logp[np.arange(len(y)), y]}
