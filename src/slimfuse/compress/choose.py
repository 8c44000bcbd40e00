"""Choose a runtime and precision by measurement on this machine, not by rule.

:func:`choose` builds each candidate (torch fp32, torch bf16 where the CPU computes it, ONNX Runtime
fp32, ONNX Runtime int8 in QDQ and QOperator format, torch int8 where its engine exists, or a given
set), times every one at the deployment batch size at every thread count 1..cores, in interleaved
rounds (so drifting load hits all alike), checks each against the metric bound on labelled data, and
picks the fastest within it. ``quantize(..., backend="auto")`` uses it to pick a scheme's backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..data import Split, Splits
from ..errors import ConfigError, SlimfuseError
from ..hardware import computes, hardware, summary
from ..measure import median_seconds


@dataclass
class Choice:
    """What :func:`choose` measured and picked."""

    name: str | None  # the fastest candidate within the bound (None when none was)
    model: nn.Module | None
    threads: int | None  # the thread count it was fastest at
    timings: list[dict] = field(default_factory=list)  # one row per candidate (see :func:`choose`)
    batch: int = 256
    within: bool = True  # False: no candidate met the bound and the closest was picked (strict=False)
    hardware: dict = field(default_factory=summary)

    def row(self, name: str) -> dict:
        for r in self.timings:
            if r["candidate"] == name:
                return r
        raise KeyError(name)

    def summary(self) -> dict:
        """JSON for a lineage step: the pick, and each candidate's best throughput (samples/s) and drop."""
        return {"picked": self.name, "threads": self.threads, "batch": self.batch, "within_bound": self.within,
                "candidates": {r["candidate"]: {"throughput": r.get("throughput"), "threads": r.get("threads"),
                                                "drop": r.get("drop"), "error": r.get("error"),
                                                "slower": r.get("slower")}
                               for r in self.timings}}


def default_candidates(model: nn.Module, calib=None) -> dict[str, Callable[[], nn.Module]]:
    """The runtimes and precisions this machine offers for ``model`` (``calib`` calibrates int8)."""
    from .quantize import quantize

    out: dict[str, Callable[[], nn.Module]] = {"torch fp32": lambda: model}
    if computes("bf16"):
        out["torch bf16"] = lambda: quantize(model, "bf16", compute="half")
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if onnxruntime is not None:
        from ..export import to_onnx

        sample = _inputs(calib)[:8] if calib is not None else None
        out["onnxruntime fp32"] = lambda: to_onnx(model, sample=sample)
        if calib is not None:
            for fmt in ("qdq", "qoperator"):
                out[f"onnxruntime int8 {fmt}"] = (
                    lambda fmt=fmt: quantize(model, "int8-static", calib=calib, backend="onnxruntime", format=fmt))
    if calib is not None and hardware()["torch"]["quantized_engines"]:
        out["torch int8"] = lambda: quantize(model, "int8-static", calib=calib, backend="torch")
    return out


def choose(model: nn.Module, sample, *, candidates: dict[str, Callable[[], nn.Module]] | None = None,
           batch: int = 256, threads: list[int] | None = None, val: Split | Splits | None = None,
           max_drop: float = 0.01, rounds: int = 3, runs: int = 5, calib=None,
           reference: str | None = None, strict: bool = True) -> Choice:
    """Time ``candidates`` (name -> builder; default :func:`default_candidates`) on ``sample`` at ``batch``.

    ``threads``: thread counts to try (default 1..cores). ``val`` (labelled): a candidate whose
    accuracy is more than ``max_drop`` (a fraction: 0.01 = 1 point) below ``model``'s is out of bounds;
    without labels no metric bound applies (``drop`` is None). Each timing is the median of ``runs``
    calls, taken in ``rounds`` interleaved rounds; a candidate's throughput is the median over rounds
    at its best thread count. A candidate that fails to build or run is recorded with its error.
    Returns a :class:`Choice`; ``timings`` rows: candidate, threads, throughput (samples/s), ms,
    spread (max-min ms over rounds at the best thread count, relative), per_threads, drop, within,
    and ``speedup`` over the ``reference`` candidate (timed alongside, never picked; e.g. the input).
    When none is within the bound: ``strict`` picks nothing, else the one with the smallest drop
    (``Choice.within`` is False).
    """
    from ..train import evaluate

    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"choose: batch must be a positive integer, got {batch!r}")
    if not (isinstance(max_drop, (int, float)) and 0 <= max_drop < 1):
        raise ConfigError(f"choose: max_drop is an accuracy fraction in [0, 1), got {max_drop!r}")
    cores = hardware()["cores"]
    threads = threads or list(range(1, cores + 1))
    if any(not isinstance(t, int) or t < 1 for t in threads):
        raise ConfigError(f"choose: threads must be positive integers, got {threads!r}")
    x = _inputs(sample)
    big = x.repeat(-(-batch // len(x)), *([1] * (x.ndim - 1)))[:batch].contiguous()
    val = val.val if isinstance(val, Splits) else val
    candidates = candidates or default_candidates(model, calib=calib if calib is not None else x)
    rows, built = [], {}
    base_acc = evaluate(model, val)["accuracy"] if val is not None else None
    for name, build in candidates.items():
        row: dict = {"candidate": name}
        try:
            m = build().eval()
            with torch.inference_mode():
                m(big[:1])
            if val is not None:
                row["drop"] = round(base_acc - evaluate(m, val)["accuracy"], 6)
            built[name] = m
        except (SlimfuseError, RuntimeError, ValueError, TypeError, NotImplementedError) as e:
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        rows.append(row)
    times: dict[tuple[str, int], list[float]] = {(n, t): [] for n in built for t in threads}
    old = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for t in threads:
                    torch.set_num_threads(t)  # ONNX Runtime sessions follow torch's count (runtime.py)
                    for name, m in built.items():
                        times[(name, t)].append(median_seconds(m, big, runs))
    finally:
        torch.set_num_threads(old)
    for row in rows:
        name = row["candidate"]
        if name not in built:
            continue
        per = {t: float(np.median(times[(name, t)])) for t in threads}
        best_t = min(per, key=per.get)
        ts = times[(name, best_t)]
        row.update(threads=best_t, ms=per[best_t] * 1e3, throughput=batch / per[best_t],
                   spread=(max(ts) - min(ts)) / per[best_t], per_threads={t: batch / s for t, s in per.items()})
        row["within"] = row.get("drop") is None or row["drop"] <= max_drop + 1e-12
    ref = next((r for r in rows if r["candidate"] == reference and "throughput" in r), None)
    for r in rows:
        if ref is not None and "throughput" in r and r is not ref:
            r["speedup"] = r["throughput"] / ref["throughput"]
            r["slower"] = r["speedup"] < 1
    timed = [r for r in rows if "throughput" in r and r["candidate"] != reference]
    ok = [r for r in timed if r["within"]]
    pick = max(ok, key=lambda r: r["throughput"]) if ok else None
    if pick is None and not strict and timed:
        pick = min(timed, key=lambda r: (r["drop"], -r["throughput"]))
    return Choice(pick and pick["candidate"], pick and built[pick["candidate"]], pick and pick["threads"], rows, batch,
                  within=bool(ok))


def _inputs(data) -> torch.Tensor:
    if isinstance(data, Splits):
        data = data.train
    if isinstance(data, Split):
        data = data.x
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if not isinstance(data, torch.Tensor) or data.ndim < 1 or len(data) == 0:
        raise ConfigError("choose: the sample must be a non-empty tensor, array, Split or Splits, "
                          f"got {type(data).__name__}")
    return data.float() if data.is_floating_point() else data
