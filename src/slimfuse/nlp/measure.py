"""Measuring sentence encoders: :func:`slimfuse.measure` with fidelity as the score.

Rows carry sentences/s at batch 1 (``throughput_b1``, from the batch-1 median latency) and at
batch 32 (``throughput_b32``), bytes on disk and the fidelity metrics; ``mean_cosine`` is the
report's metric (plots, Pareto fronts).
"""

from __future__ import annotations

from torch import nn

from ..data import Split
from ..measure import Report, Score, measure


def measure_encoders(models: nn.Module | dict[str, nn.Module], split: Split, score: Score, *, threads: int = 2,
                     seconds: float = 1.0, batch: int = 32) -> Report:
    """Measure sentence encoders on ``split`` (token ids) with ``score`` (``fidelity_score(reference)``)."""
    report = measure(models, split, score=score, metric="mean_cosine", batch=batch, threads=threads, seconds=seconds)
    for row in report.rows:
        row["throughput_b1"] = 1e3 / row["latency_b1_p50_ms"]
    return report
