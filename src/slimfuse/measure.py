"""Measure what users feel: accuracy, real bytes on disk, parameters, MACs, latency.

Every row is measured, never estimated: bytes are the size of the artifact
folder ``slimfuse.save`` writes, latency is wall-clock time after warm-up with
a fixed thread count. A predictor can refine what is measured by defining
optional methods: ``slimfuse_artifact_bytes()``, ``slimfuse_counts()``
(``{"params": n, "nonzeros": n}``), ``slimfuse_macs()``, ``slimfuse_device()`` (where it runs, for a
runtime that picks its own device); and the attribute
``slimfuse_runtime`` (default ``"torch"``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import configs, devices, stats
from .data import Split
from .data.feed import feed, n_samples, take
from .errors import ConfigError
from .hardware import describe, summary
from .models.artifact import folder_bytes, save
from .models.calling import call
from .models.keras import torch_of
from .models.spec import lineage_of, lineage_str, spec_of
from .train import check_fits, predict, predict_labelled


def artifact_bytes(model: nn.Module) -> int:
    """Bytes on disk of the artifact ``slimfuse.save`` writes for ``model``."""
    if hasattr(model, "slimfuse_artifact_bytes"):
        return int(model.slimfuse_artifact_bytes())
    with tempfile.TemporaryDirectory(prefix="slimfuse-measure-") as tmp:
        if spec_of(model) is not None:
            return folder_bytes(save(model, Path(tmp) / "a"))
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(Path(tmp) / "w.safetensors"))
        return folder_bytes(Path(tmp) / "w.safetensors")


def counts(model: nn.Module) -> dict[str, int]:
    """Parameters and non-zero parameters."""
    if hasattr(model, "slimfuse_counts"):
        return dict(model.slimfuse_counts())
    params = list(model.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "nonzeros": sum(int(torch.count_nonzero(p)) for p in params),
    }


def macs(model: nn.Module, sample) -> int | None:
    """Multiply-accumulates for one sample, from PyTorch's FLOP counter (None if uncountable).
    ``sample``: inputs of any form (``models/calling.py``)."""
    if hasattr(model, "slimfuse_macs"):
        return model.slimfuse_macs()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            call(model.eval(), take(sample, slice(0, 1)))
    except Exception:  # an op the counter cannot trace: say "unknown" rather than guess
        return None
    # zero means the counter saw none of the work (e.g. ONNX Runtime members of an ensemble): unknown
    return counter.get_total_flops() // 2 or None


def latency(model: nn.Module, x, *, threads: int = 2, seconds: float = 1.0, batch: int = 256) -> dict:
    """Batch-1 latency p50/p95 (ms) and batch-``batch`` throughput (samples/s), after warm-up.
    ``x``: inputs of any form (a tensor, a tuple or a dict of tensors)."""
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if n_samples(x) == 0:
        raise ConfigError("cannot time a model on an empty split")
    # the samples repeated up to the batch (every input of a tuple or dict alike)
    big = take(x, torch.arange(batch) % n_samples(x))
    one = take(x, torch.arange(1))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        with torch.inference_mode():
            b1 = _timeit(model, one, seconds=seconds * 0.6, min_runs=30)
            bb = _timeit(model, big, seconds=seconds * 0.4, min_runs=5)
    finally:
        torch.set_num_threads(old)
    return {
        "latency_b1_p50_ms": float(np.percentile(b1, 50) * 1e3),
        "latency_b1_p95_ms": float(np.percentile(b1, 95) * 1e3),
        f"latency_b{batch}_ms": float(np.median(bb) * 1e3),
        f"throughput_b{batch}": float(batch / np.median(bb)),
    }


def median_seconds(fn, x, runs: int) -> float:
    """Median wall-clock seconds of ``runs`` calls ``fn(x)`` after one warm-up call (one round of an
    interleaved comparison: callers alternate variants between rounds so load drift hits all alike)."""
    fn(x)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _timeit(model, x, *, seconds: float, min_runs: int) -> np.ndarray:
    where = devices.where(x)
    sync = torch.cuda.synchronize if where.type == "cuda" else (lambda *_: None)  # GPU work is asynchronous
    for _ in range(3):  # warm-up: allocator, kernels, lazy init
        call(model, x)
    sync(where)
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < 10_000):
        t0 = time.perf_counter()
        call(model, x)
        sync(where)
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


Score = Callable[[nn.Module, Split], dict]


def _parent(row: dict, by_lineage: dict[str, dict]) -> dict | None:
    """The row whose lineage is the longest proper prefix of ``row``'s lineage: the model it was made from."""
    steps = row.get("lineage", "").split(" -> ")
    for n in range(len(steps) - 1, 0, -1):
        parent = by_lineage.get(" -> ".join(steps[:n]))
        if parent is not None and parent is not row:
            return parent
    return None


def flag_slower(rows: list[dict]) -> list[dict]:
    """Mark each row measured slower (throughput at the large batch) than the row of its input model.

    The input is the row whose lineage is the longest prefix of the row's own (``train -> prune`` is the
    input of ``train -> prune -> quantize``); a row whose input was not measured is left alone. A
    flagged row gets ``"slower": <input's name>`` and ``"speedup"`` (< 1); rows with a measured input
    get ``"speedup"`` either way."""
    by_lineage: dict[str, dict] = {}
    for r in rows:
        by_lineage.setdefault(r.get("lineage", ""), r)
    for r in rows:
        parent = _parent(r, by_lineage) if r.get("lineage") else None
        key = next((k for k in r if k.startswith("throughput_b")), None)
        if parent is None or key is None or not parent.get(key) or r.get(key) is None:
            continue
        r["speedup"] = float(r[key] / parent[key])
        if r[key] < parent[key]:
            r["slower"] = parent["name"]
        else:
            r.pop("slower", None)
    return rows


def measure_one(name: str, model: nn.Module, split, *, threads: int = 2, seconds: float = 1.0,
                score: Score | None = None, batch: int = 256, samples: dict | None = None,
                device: str | torch.device | None = "cpu") -> dict:
    """One row. ``score(model, split) -> {metric: value}`` replaces the classification metrics
    (accuracy, NLL) for other tasks: embedding fidelity, ranking quality. With classification
    metrics, ``samples[name]`` (when a dict is given) receives the per-sample correctness and NLL
    that :meth:`Report.compare` pairs. ``split``: a :class:`Split`, or labelled data of any form
    :func:`slimfuse.data.feed.feed` reads (a DataLoader of dict batches, ...): accuracy and NLL are
    streamed over all of it, MACs and latency use its first ``batch`` samples. ``device``: where the
    model runs for its metrics and timings (a CPU-only model stays on the CPU; the row's ``device``
    says where it ran); MACs and bytes are counted on the CPU."""
    row: dict = {"name": name, "runtime": getattr(model, "slimfuse_runtime", "torch")}
    x = split.x if isinstance(split, Split) else feed(split, batch_size=batch, labels=None,
                                                        where="the measurement data").head(batch).x
    with devices.placed(model, devices.resolve(device)) as where:
        row.update(_run_metrics(name, model, split, x, threads=threads, seconds=seconds, score=score, batch=batch,
                                samples=samples, where=where))
    row.update(counts(model))
    row["macs"] = macs(model, x)
    row["bytes"] = artifact_bytes(model)
    row.update(row.pop("_latency"))
    row["threads"] = threads
    row["device"] = model.slimfuse_device() if hasattr(model, "slimfuse_device") else str(where)
    row["lineage"] = lineage_str(lineage_of(model))
    return row


def _run_metrics(name, model, split, x, *, threads, seconds, score, batch, samples, where) -> dict:
    """Accuracy and NLL (or ``score``) and the timings of ``model``, which is on ``where``."""
    row: dict = {}
    if score is None:
        if isinstance(split, Split):
            check_fits(model, split)
            logits, y = predict(model, split), split.y
        else:
            check_fits(model, Split(x, None))
            logits, y = predict_labelled(model, split)
        per = stats.per_sample(logits.numpy(), y.numpy())
        row.update(accuracy=(logits.argmax(-1) == y).float().mean().item(),
                   nll=F.cross_entropy(logits, y).item())
        if samples is not None:
            samples[name] = {"correct": per["correct"], "nll": per["nll"].astype(np.float32)}
    else:
        row.update(score(model, split))
    row["_latency"] = latency(model, devices.to(x, where), threads=threads, seconds=seconds, batch=batch)
    return row


def measure(models: nn.Module | dict[str, nn.Module], split, *, threads: int = 2, seconds: float = 1.0,
            score: Score | None = None, metric: str = "accuracy", batch: int = 256,
            device: str | torch.device | None = "cpu") -> Report:
    """Measure one model or a dict ``{name: model}`` on ``split``; returns a :class:`Report`.

    ``split``: a :class:`Split` or labelled data of any form :func:`slimfuse.data.feed.feed` reads
    (read once per model, streamed).

    ``score`` and ``metric`` (the higher-is-better key of ``score``'s result that plots and Pareto
    fronts use) adapt the report to tasks other than classification; ``batch`` is the large batch
    timed for throughput. ``device``: where the models run (default the CPU, where slimfuse's results
    ship; ``auto``/``cuda[:N]`` time them on the GPU, synchronised; CPU-only models stay on the CPU)."""
    models = torch_of(models)
    configs.Measure.build(threads=threads, seconds=seconds)
    if isinstance(models, nn.Module):
        models = {"model": models}
    if not models:
        raise ConfigError("nothing to measure: no models given")
    samples: dict = {}
    devices.resolve(device)  # a device that is not there: refused before any work
    rows = [measure_one(n, m, split, threads=threads, seconds=seconds, score=score, batch=batch, samples=samples,
                        device=device) for n, m in models.items()]
    if any(metric not in r for r in rows):
        raise ConfigError(f"the score has no metric {metric!r}; it gives {sorted(set(rows[0]) - {'name'})}")
    return Report(rows, metric=metric, samples=samples)


_COLUMNS = [
    ("name", "model", "{}"),
    ("runtime", "runtime", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("nll", "NLL", "{:.4f}"),
]
_TAIL = [
    ("params", "params", "{:,}"),
    ("nonzeros", "non-zeros", "{:,}"),
    ("macs", "MACs", "{:,}"),
    ("bytes", "bytes on disk", "{:,}"),
    ("latency_b1_p50_ms", "b1 p50 ms", "{:.3f}"),
    ("latency_b1_p95_ms", "b1 p95 ms", "{:.3f}"),
]


def register_column(key: str, label: str, fmt: str = "{:.4f}") -> None:
    """Show the metric ``key`` (from a custom ``score``) in report tables, after the accuracy columns."""
    if all(c[0] != key for c in _COLUMNS):
        _COLUMNS.append((key, label, fmt))


@dataclass
class Comparison:
    """``a`` vs ``b`` on one metric: the paired difference ``a - b`` with its interval and a verdict
    (``"better"``: ``a`` is better beyond noise, ``"worse"``, or ``"tie"``); for accuracy also
    McNemar's exact p-value."""

    a: str
    b: str
    metric: str
    interval: stats.Interval
    verdict: str
    p_value: float | None = None

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "metric": self.metric, **self.interval.to_dict(),
                "verdict": self.verdict, "p_value": self.p_value}

    def __str__(self) -> str:
        p = f", McNemar p={self.p_value:.3g}" if self.p_value is not None else ""
        return f"{self.a} vs {self.b}: {self.metric} {self.interval} ({self.verdict}{p})"


_LOWER_IS_BETTER = {"nll"}


@dataclass
class Report:
    """Rows of measurements; ``to_markdown()``, ``to_json()``, ``row(name)``, ``compare(a, b)``."""

    rows: list[dict] = field(default_factory=list)
    metric: str = "accuracy"  # the higher-is-better quality metric of plots and Pareto fronts
    extra: list[tuple[str, str, str]] = field(default_factory=list)  # this report's own (key, label, format) columns
    hardware: dict = field(default_factory=summary)  # the machine the rows were measured on

    def __post_init__(self) -> None:
        flag_slower(self.rows)
    # per model name: per-sample "correct" (bool) and "nll" on the measured split (classification only)
    samples: dict = field(default_factory=dict, repr=False)

    def compare(self, a: str, b: str, metric: str = "accuracy", *, level: float = 0.95, n_boot: int = 2000,
                seed: int = 0) -> Comparison:
        """Paired difference ``a - b`` on ``metric`` (``accuracy`` or ``nll``) over the test samples,
        with a ``level`` paired-bootstrap interval and the verdict for ``a``: better, worse or tie."""
        if metric not in ("accuracy", "nll"):
            raise ConfigError(f"compare works on per-sample metrics: accuracy or nll, not {metric!r}")
        for name in (a, b):
            self.row(name)  # KeyError names an unknown model
            if name not in self.samples:
                raise ConfigError(f"no per-sample results for {name!r}: compare needs rows measured by "
                                  "measure() with classification metrics")
        key = "correct" if metric == "accuracy" else "nll"
        va, vb = self.samples[a][key], self.samples[b][key]
        interval = stats.paired_bootstrap(va, vb, n_boot=n_boot, level=level, seed=seed)
        p = stats.mcnemar(va, vb)["p_value"] if metric == "accuracy" else None
        return Comparison(a, b, metric, interval,
                          stats.verdict(interval, higher_is_better=metric not in _LOWER_IS_BETTER), p)

    def row(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(name)

    def columns(self) -> list[tuple[str, str, str]]:
        """(key, label, format) of the standard columns present in at least one row."""
        batches = sorted({int(k[len("throughput_b"):]) for r in self.rows for k in r if k.startswith("throughput_b")})
        cols = _COLUMNS + self.extra + _TAIL + [(f"throughput_b{b}", f"b{b} samples/s", "{:,.0f}") for b in batches]
        return [c for c in cols if any(c[0] in r for r in self.rows)]

    @staticmethod
    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        return "n/a" if value is None else fmt.format(value)

    def to_markdown(self, *, lineage: bool = True) -> str:
        cols = self.columns()
        head = [c[1] for c in cols] + (["lineage"] if lineage else [])
        lines = [f"Measured on: {describe(self.hardware)}", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [self.cell(r, key, f) for key, _, f in cols]
            if r.get("slower") and cells:
                cells[0] += f" (slower than {r['slower']})"
            if lineage:
                cells.append(r.get("lineage", ""))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({"metric": self.metric, "hardware": self.hardware, "rows": self.rows}, indent=2)

    def __str__(self) -> str:
        return self.to_markdown()
