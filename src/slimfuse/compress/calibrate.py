"""Activation calibration for static int8: min-max, percentile and entropy (KL) calibrators.

:func:`observe` runs calibration inputs through a float model with hooks on the
points to be quantized, in two passes: the first finds each point's min and max,
the second (for percentile and entropy) fills a fixed-range histogram. A calibrator
turns these statistics into a ``(lo, hi)`` range per point.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.feed import n_samples, take
from ..errors import ConfigError
from ..models.calling import call

BINS = 2048


class _Stats:
    def __init__(self):
        self.lo, self.hi = float("inf"), float("-inf")
        self.hist = None  # histogram of x over [lo, hi]
        self.abs_hist = None  # histogram of |x| over [0, max|x|]

    @property
    def amax(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    def first(self, x: torch.Tensor):
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def second(self, x: torch.Tensor):
        x = x.detach().float().flatten()
        if self.hist is None:
            self.hist, self.abs_hist = np.zeros(BINS), np.zeros(BINS)
        if self.hi > self.lo:
            self.hist += torch.histc(x, BINS, self.lo, self.hi).double().numpy()
        if self.amax > 0:
            self.abs_hist += torch.histc(x.abs(), BINS, 0.0, self.amax).double().numpy()


def minmax(s: _Stats, **_) -> tuple[float, float]:
    return s.lo, s.hi


def percentile(s: _Stats, *, percentile: float = 99.99, **_) -> tuple[float, float]:
    """Clip the ``(100 - p)/2`` % tails on each side (nothing is clipped below a ReLU's zeros)."""
    if s.hist is None or s.hist.sum() == 0:
        return s.lo, s.hi
    cdf = np.cumsum(s.hist) / s.hist.sum()
    tail = (100.0 - percentile) / 100.0 / 2
    edges = np.linspace(s.lo, s.hi, BINS + 1)
    lo = edges[int(np.searchsorted(cdf, tail))]
    hi = edges[min(int(np.searchsorted(cdf, 1.0 - tail)) + 1, BINS)]
    return (s.lo if s.lo >= 0 else float(lo)), float(hi)


def entropy(s: _Stats, *, levels: int = 128, **_) -> tuple[float, float]:
    """TensorRT's KL-divergence threshold on the histogram of ``|x|``.

    For each candidate threshold, the clipped distribution P (outliers piled into the last
    bin) is compared with Q, P re-binned onto the ``levels`` quantization steps; the
    threshold with the least KL(P || Q) wins. The bin holding zero is left out.
    """
    if s.abs_hist is None or s.abs_hist[1:].sum() == 0:
        return s.lo, s.hi
    h = s.abs_hist.copy()
    h[0] = 0  # zeros (ReLU outputs, image background) are exact on any grid; their spike would pull t to 0
    if s.lo < 0:  # a signed range shares the grid between both signs
        levels //= 2
    best_kl, best_i = float("inf"), BINS
    for i in range(levels, BINS + 1, 16):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        idx = (np.arange(i) * levels) // i
        sums = np.bincount(idx, weights=h[:i], minlength=levels)
        nz = np.bincount(idx, weights=(h[:i] > 0).astype(float), minlength=levels)
        q = np.where(h[:i] > 0, sums[idx] / np.maximum(nz[idx], 1), 0.0)
        mask = p > 0
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-12)
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    t = best_i * s.amax / BINS
    return max(s.lo, -t), min(s.hi, t)


CALIBRATORS = {"minmax": minmax, "percentile": percentile, "entropy": entropy}


def check_calibrator(name: str) -> None:
    if name not in CALIBRATORS:
        raise ConfigError(f"unknown calibrator {name!r} (choose: {', '.join(CALIBRATORS)})")


@torch.no_grad()
def observe(model: nn.Module, points: dict[str, tuple[str, str]], x: torch.Tensor, *, calibrator: str = "minmax",
            batch_size: int = 256, **options) -> dict[str, tuple[float, float]]:
    """Ranges of activations at ``points``: ``{key: (module_path, "input" | "output")}``.

    ``model`` must be a float model in eval mode (the caller's copy; hooks are removed after).
    """
    check_calibrator(calibrator)
    stats = {key: _Stats() for key in points}
    by_module: dict[str, list[tuple[str, str]]] = {}
    for key, (path, where) in points.items():
        by_module.setdefault(path, []).append((key, where))

    def run(method: str):
        handles = []
        for path, wanted in by_module.items():
            module = model.get_submodule(path)

            def hook(mod, args, out, wanted=wanted):
                for key, where in wanted:
                    getattr(stats[key], method)(args[0] if where == "input" else out)

            handles.append(module.register_forward_hook(hook))
        try:
            for i in range(0, n_samples(x), batch_size):
                call(model, take(x, slice(i, i + batch_size)))  # inputs of any form (models/calling.py)
        finally:
            for h in handles:
                h.remove()

    run("first")
    if calibrator != "minmax":
        run("second")
    fn = CALIBRATORS[calibrator]
    return {key: tuple(float(v) for v in fn(s, **options)) for key, s in stats.items()}
