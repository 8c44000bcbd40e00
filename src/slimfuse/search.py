"""``slimfuse.optimize``: an accuracy-aware search across pruning x quantization x distillation x ensembles.

The search runs in levels, within a time budget, and measures every candidate in its deployment
runtime (ONNX Runtime for ONNX models, torch otherwise), with real bytes on disk:

1. every *finishing* move (ONNX export, int8 in ONNX Runtime and torch, codebooks) on the input
   model: no training, so these come first;
2. every *structural* move on the input model: magnitude pruning at several sparsities (bytes),
   channel pruning at several fractions (latency), distillation into narrower students;
3. every finishing move on each structural candidate that kept the metric within ``max_drop``;
4. an ensemble of compressed members (the best finished student, trained again from other seeds),
   and the same members merged in weight space into one network (``merge(..., "rebasin")``).

Selection uses the validation split only: the constraint is "validation metric at most
``max_drop`` points below the input model's". The reported metric columns are measured on the test
split. The result is never empty: the best candidate meeting the constraint, else the closest one,
said plainly, and the whole Pareto set either way.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import configs, devices
from .data import Splits
from .data.feed import SPLIT_NAMES, splits_of
from .errors import ConfigError, SlimfuseError
from .hardware import computes
from .measure import Report, Score, measure_one
from .models.keras import torch_of

OBJECTIVES = {  # objective -> (row key, lower is better, label); throughput times the task's large batch
    "latency": ("latency_b1_p50_ms", "batch-1 latency p50 (ms)"),
    "throughput": ("latency_b256_ms", "large-batch latency (ms)"),
    "bytes": ("bytes", "bytes on disk"),
}


# task kind -> (fn(model, data, objective, device) -> (moves, score, metric), timed batch): the search space
# and quality measure of tasks other than classification (registered by slimfuse.nlp, slimfuse.recsys)
TASKS: dict[str, tuple[Callable, int]] = {}


def register_task(kind: str, *, batch: int = 256):
    """Register ``fn(model, data, objective, device) -> (moves, score, metric)`` for data of task ``kind``
    (``device``: the name of the device the moves that train use, or refuse); ``batch`` is the large batch
    timed for throughput (e.g. 32 sentences for an encoder)."""

    def deco(fn):
        TASKS[kind] = (fn, batch)
        return fn

    return deco


@dataclass
class Move:
    """One named transform. Structural moves take ``(model, seed)``; finishing moves ``(model)``."""

    name: str
    apply: Callable
    finishing: bool = False
    objectives: tuple[str, ...] = tuple(OBJECTIVES)  # the objectives it can help


@dataclass
class Candidate:
    name: str
    model: nn.Module | None
    row: dict = field(default_factory=dict)  # test metrics, bytes, latency; plus val_<metric>
    drop: float | None = None  # validation points below the input model (negative: better)
    meets: bool = False
    error: str | None = None
    seconds: float = 0.0


@dataclass
class SearchResult:
    baseline: Candidate
    best: Candidate | None  # the best candidate meeting the constraint (None if none did)
    closest: Candidate  # the best when one met it; else the one with the smallest drop
    pareto: list[Candidate]
    candidates: list[Candidate]
    skipped: list[str]
    objective: str
    metric: str
    max_drop: float
    report: Report
    key: str  # the row key the objective minimizes
    # the chosen candidate vs the input model on the test split (the constraint was checked on val):
    # accuracy difference in points with its 95% paired interval and whether max_drop held ("met"),
    # failed beyond noise ("missed") or cannot be told ("tie"); None for custom scores
    held_out: dict | None = None

    @property
    def met(self) -> bool:
        return self.best is not None

    @property
    def message(self) -> str:
        key = self.key
        c = self.best or self.closest
        gain = self.baseline.row[key] / c.row[key] if c.row.get(key) else float("nan")
        what = (f"{c.name}: validation {self.metric} {c.row[f'val_{self.metric}']:.4f} "
                f"({-c.drop:+.2f} pt vs the input model), {gain:.2f}x better {self.objective}, "
                f"{c.row['bytes']:,} bytes, batch-1 latency {c.row['latency_b1_p50_ms']:.3f} ms")
        h = self.held_out
        if h is not None:
            what += (f"; on the test split {h['diff_points']:+.2f} pt [{h['lo_points']:+.2f}, {h['hi_points']:+.2f}] "
                     f"vs the input model (max_drop there: {h['verdict']})")
        if self.best is not None:
            return f"best within {self.max_drop:g} pt: {what}"
        return (f"NO candidate kept validation {self.metric} within {self.max_drop:g} pt of the input model; "
                f"the closest is {what}")

    def save(self, out: str | Path) -> Path:
        """Write the best model to ``out/best`` (or, when none met the constraint, the closest to
        ``out/closest``), the report of every candidate to ``out/report.{md,html,json}`` and a summary
        to ``out/search.json``."""
        from .models import save
        from .models.artifact import write_text_atomic
        from .report import write_report

        out = Path(out)
        chosen = self.best or self.closest
        if chosen.model is not None and chosen is not self.baseline:
            save(chosen.model, out / ("best" if self.met else "closest"),
                 metrics={"test": {k: v for k, v in chosen.row.items() if isinstance(v, (int, float))}})
        pareto = "\n".join(f"- {c.name}" for c in self.pareto)
        failed = "\n".join(f"- {c.name}: {c.error}" for c in self.candidates if c.error) or "none"
        title = f"slimfuse optimize: {self.objective} within {self.max_drop:g} pt"
        write_report(self.report, out, title=title, sections=[
            ("Result", self.message),
            ("Pareto set (validation metric vs objective)", pareto),
            ("Not tried (time budget)", "\n".join(self.skipped) or "none"),
            ("Failed candidates", failed),
        ])
        summary = {
            "met": self.met, "message": self.message, "objective": self.objective, "metric": self.metric,
            "max_drop_points": self.max_drop, "best": chosen.name if self.met else None, "held_out": self.held_out,
            "closest": self.closest.name, "pareto": [c.name for c in self.pareto],
            "skipped": self.skipped, "failed": {c.name: c.error for c in self.candidates if c.error},
            "candidates": [{"name": c.name, "drop_points": c.drop, "meets": c.meets, "seconds": c.seconds,
                            **c.row} for c in self.candidates if not c.error],
        }
        write_text_atomic(out / "search.json", json.dumps(summary, indent=2) + "\n")
        return out


def optimize(
    model: nn.Module,
    data: Splits | dict,
    *,
    max_drop: float = 0.5,
    objective: str = "latency",
    budget_s: float = 300.0,
    moves: list[Move] | None = None,
    score: Score | None = None,
    metric: str = "accuracy",
    ensemble: bool = True,
    seed: int = 0,
    seconds: float = 0.5,
    log: Callable[[str], None] | None = None,
    device: str | torch.device | None = "cpu",
) -> SearchResult:
    """Search compressed versions of ``model`` whose validation ``metric`` stays within ``max_drop``
    points (0.5 = half a point of accuracy) of ``model``'s, minimizing ``objective`` (``latency``:
    batch-1 p50; ``throughput``: the time of one large batch, 256 samples or the task's own; ``bytes``:
    on disk). ``budget_s`` bounds the search's wall time after the input model is measured (a candidate is not started
    past it), so a slow baseline on a loaded machine does not use up a short budget before the first move.
    ``moves``/``score``/``metric`` adapt the search to other tasks (default: the classification moves
    and accuracy, or the moves a task kind registered). ``device``: where the moves that train run
    (pruning fine-tunes, distillation, codebook fine-tuning; :func:`slimfuse.devices.resolve`); every
    candidate is measured on the CPU. Returns a :class:`SearchResult`; its ``held_out`` pairs the chosen
    candidate with the input model on the test split (accuracy difference in points, 95% interval, and
    whether ``max_drop`` held there: ``met``, ``tie`` or ``missed``), and a best candidate that missed
    it there beyond noise is warned about: the validation split chose it among many.

    ``data``: Splits, or a dict ``{"train": ..., "val": ..., "test": ...}`` of labelled classification
    data in any form :func:`slimfuse.data.feed.feed` reads (DataLoaders, Datasets, arrays), each read
    into memory under the memory budget (other task kinds bring their Splits, which carry the task).
    """
    model = torch_of(model)
    devices.resolve(device)  # a device that is not there: refused before any work
    device = "auto" if device is None else str(device)  # a name the moves pass on
    configs.Optimize.build(max_drop=max_drop, objective=objective, budget_s=budget_s, ensemble=ensemble)
    from .train import probe

    # the search fine-tunes on train, selects on val and reports on test: a dict of the three, in any form
    data = splits_of(data, needs=SPLIT_NAMES, where="optimize's data",
                     classes=lambda x: probe(model, x, who="the model").shape[-1])
    log = log or (lambda _: None)
    kind, batch = data.task.kind, 256
    if moves is None and score is None:
        if kind not in TASKS:
            raise ConfigError(f"no search space for {kind!r} tasks (known: {', '.join(sorted(TASKS))})")
        space, batch = TASKS[kind]
        moves, score, metric = space(model, data, objective, device)
    elif moves is None:
        raise ConfigError("a custom score= needs its own moves= (the registered search spaces bring both)")
    search = _Search(model, data, objective=objective, max_drop=float(max_drop), budget_s=float(budget_s),
                     score=score, metric=metric, seed=seed, seconds=seconds, log=log, batch=batch)
    result = search.run([m for m in moves if objective in m.objectives], ensemble=ensemble and score is None)
    h = result.held_out
    if result.met and h is not None and h["verdict"] == "missed":
        warnings.warn(
            f"optimize: {h['candidate']!r} kept validation accuracy within {max_drop:g} pt, but on the test split it "
            f"is {-h['diff_points']:.2f} pt below the input model (95% interval [{h['lo_points']:+.2f}, "
            f"{h['hi_points']:+.2f}] pt), beyond max_drop: the choice among {len(result.candidates) - 1} candidates "
            f"on {len(data.val):,} validation samples did not hold; a larger validation split or a smaller "
            "max_drop makes it safer", UserWarning, stacklevel=2)
    return result


class _Search:
    def __init__(self, model, data, *, objective, max_drop, budget_s, score, metric, seed, seconds, log, batch):
        from .train import check_fits, evaluate

        if score is None:
            check_fits(model, data.val)
        self.data, self.objective, self.max_drop, self.metric = data, objective, max_drop, metric
        self.score = score or evaluate
        self.default_score = score is None  # measure's own accuracy/NLL, per test sample as well
        self.seed, self.seconds, self.log, self.batch = seed, seconds, log, batch
        self.deadline = float("inf")
        self.key = f"latency_b{batch}_ms" if objective == "throughput" else OBJECTIVES[objective][0]
        self.candidates: list[Candidate] = []
        self.skipped: list[str] = []
        self.samples: dict = {}  # per-sample test results (default score): the held-out check of the choice
        self.baseline = self.evaluate("input model", lambda: model)
        self.deadline = time.perf_counter() + budget_s  # the candidates' time, after the baseline's
        if self.baseline.error:
            raise ConfigError(f"cannot measure the input model: {self.baseline.error}")

    def evaluate(self, name: str, build: Callable[[], nn.Module]) -> Candidate:
        if self.candidates and time.perf_counter() > self.deadline:
            self.skipped.append(name)
            return Candidate(name, None, error="not tried: time budget spent")
        t0 = time.perf_counter()
        self.log(f"candidate {name} ...")
        try:
            m = build()
            val = self.score(m, self.data.val)
            row = measure_one(name, m, self.data.test, score=None if self.default_score else self.score,
                              seconds=self.seconds, batch=self.batch, samples=self.samples)
        except (SlimfuseError, RuntimeError, ValueError) as e:  # one move failing must not end the search;
            # a TypeError, AttributeError or KeyError is a programming error and propagates
            c = Candidate(name, None, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            self.candidates.append(c)
            self.log(f"candidate {name}: failed ({c.error})")
            return c
        if self.metric not in val:
            raise ConfigError(f"the score has no metric {self.metric!r}; it gives {sorted(val)}")
        row[f"val_{self.metric}"] = val[self.metric]
        c = Candidate(name, m, row, seconds=round(time.perf_counter() - t0, 2))
        base = self.baseline.row[f"val_{self.metric}"] if self.candidates else val[self.metric]
        c.drop = (base - val[self.metric]) * 100
        c.meets = c.drop <= self.max_drop + 1e-9
        self.candidates.append(c)
        self.log(f"candidate {name}: val {self.metric} {val[self.metric]:.4f} ({-c.drop:+.2f} pt), "
                 f"{row['bytes']:,} bytes, b1 {row['latency_b1_p50_ms']:.3f} ms ({c.seconds:.1f} s)")
        return c

    def run(self, moves: list[Move], *, ensemble: bool) -> SearchResult:
        structural = [m for m in moves if not m.finishing]
        finishing = [m for m in moves if m.finishing]
        finished = {}

        def finish(parent: Candidate) -> None:
            for mv in finishing:
                name = mv.name if parent is self.baseline else f"{parent.name} > {mv.name}"
                c = self.evaluate(name, lambda mv=mv, p=parent: mv.apply(p.model))
                if c.model is not None:
                    finished[name] = (parent, mv, c)

        finish(self.baseline)  # the cheap moves first: no training, often most of the gain
        made = {}
        for mv in structural:
            c = self.evaluate(mv.name, lambda mv=mv: mv.apply(self.baseline.model, self.seed))
            if c.model is not None:
                made[mv.name] = (mv, c)
        ok = [c for _, c in made.values() if c.meets]
        if not ok:  # nothing met it: finish the two closest anyway, one of them may still be the closest
            ok = sorted((c for _, c in made.values()), key=lambda c: c.drop)[:2]
        for parent in ok:
            finish(parent)
        if ensemble:
            self.ensemble_of_compressed(made, finished)
        return self.result()

    def ensemble_of_compressed(self, made: dict, finished: dict) -> None:
        """Three copies of the best finished structural candidate, from three seeds: averaged as an
        ensemble (three forward passes), and merged in weight space (``rebasin``: one network of the
        same size, so the ensemble's gain at no inference cost where the merge keeps it), then finished."""
        pool = [(p, mv, c) for p, mv, c in finished.values() if p is not self.baseline and c.meets] or \
               [(p, mv, c) for p, mv, c in finished.values() if p is not self.baseline]
        if not pool:
            return
        parent, finish, first = min(pool, key=lambda t: t[2].row[self.key])
        move = made[parent.name][0]
        trained: list[nn.Module] = []  # the two other seeds' structural candidates, trained once for both

        def others() -> list[nn.Module]:
            if not trained:
                trained.extend(move.apply(self.baseline.model, self.seed + i) for i in (1, 2))
            return trained

        def build():
            from .fuse import ensemble

            return ensemble([first.model, *[finish.apply(m) for m in others()]], "mean", self.data)

        def merged():
            from .fuse import merge

            with warnings.catch_warnings():  # a merge worse than its members is measured, not warned about
                warnings.simplefilter("ignore", UserWarning)
                one = merge([parent.model, *others()], "rebasin", self.data, seed=self.seed)
            return finish.apply(one)

        self.evaluate(f"ensemble of 3 x ({first.name})", build)
        self.evaluate(f"merge of 3 x ({parent.name}) > {finish.name}", merged)

    def result(self) -> SearchResult:
        from .report import pareto_front

        done = [c for c in self.candidates if c.model is not None]
        key, metric = self.key, f"val_{self.metric}"
        # a compressed model measured slower than its input is never the best for a speed objective
        slower = {c.name for c in done if self.objective in ("latency", "throughput") and c is not self.baseline
                  and c.row[key] > self.baseline.row[key]}
        meeting = [c for c in done if c.meets and c is not self.baseline and c.name not in slower]
        best = min(meeting, key=lambda c: (c.row[key], c.drop)) if meeting else None
        closest = best or min((c for c in done if c is not self.baseline), key=lambda c: (c.drop, c.row[key]),
                              default=self.baseline)
        front = set(pareto_front([c.row for c in done], key, metric))
        pareto = sorted((c for c in done if c.name in front), key=lambda c: c.row[key])
        report = Report([c.row for c in done], metric=self.metric,
                        extra=[(f"val_{self.metric}", f"val {self.metric}", "{:.4f}")], samples=self.samples)
        return SearchResult(self.baseline, best, closest, pareto, self.candidates, self.skipped, self.objective,
                            self.metric, self.max_drop, report, key, self.held_out(report, closest))

    def held_out(self, report: Report, chosen: Candidate) -> dict | None:
        """The chosen candidate's test accuracy against the input model's, paired, and what it says of
        ``max_drop`` (chosen on the validation split, among many candidates, so it can fail there)."""
        if chosen is self.baseline or self.metric != "accuracy" or chosen.name not in self.samples:
            return None
        iv = report.compare(chosen.name, self.baseline.name, "accuracy").interval
        lo, hi = 100 * iv.lo, 100 * iv.hi
        verdict = "met" if lo >= -self.max_drop - 1e-9 else "missed" if hi < -self.max_drop else "tie"
        return {"candidate": chosen.name, "diff_points": round(100 * iv.diff, 3), "lo_points": round(lo, 3),
                "hi_points": round(hi, 3), "level": iv.level, "samples": iv.n, "verdict": verdict}


# ---------------------------------------------------------------------------------------------
# The classification search space


@register_task("classification")
def classification_space(model: nn.Module, data: Splits, objective: str,
                         device: str = "cpu") -> tuple[list[Move], None, str]:
    """The classification search space: its moves, the default score (accuracy, NLL) and ``accuracy``."""
    return classification_moves(model, data, objective, device), None, "accuracy"


def classification_moves(model: nn.Module, data: Splits, objective: str, device: str = "cpu") -> list[Move]:
    """Pruning (sparsity for bytes, channels for speed), distillation into 1/2- and 1/4-width
    students, and the finishing moves: ONNX export, int8 (ONNX Runtime static and dynamic, torch
    static), 5-bit codebooks (bytes)."""
    from .compress.distill import distill
    from .compress.prune import prune
    from .compress.quantize import quantize
    from .export import to_onnx
    from .models import zoo

    images = len(data.task.input_shape) == 3
    speed = ("latency", "throughput")

    def sparse(s):
        return lambda m, seed: prune(m, s, data=data, epochs=4, seed=seed, device=device)

    def channels(c):
        return lambda m, seed: prune(m, channels=c, data=data, epochs=4, seed=seed, device=device)

    def student(width):
        def apply(m, seed):
            torch.manual_seed(seed)
            s = zoo.student(m, width=width)
            return distill(m, s, data, temperature=4.0, alpha=0.9, epochs=10, batch_size=128, lr=2e-3,
                           schedule="cosine", transfer="augment" if images else "train", copies=2,
                           mixup=1.0, seed=seed, progress=False, device=device)
        return apply

    def q(scheme, backend):
        return lambda m: quantize(m, scheme, calib=data, backend=backend)

    return [
        *[Move(f"prune sparsity {s}", sparse(s), objectives=("bytes",)) for s in (0.8, 0.9, 0.95)],
        *[Move(f"prune channels {c}", channels(c), objectives=speed) for c in (0.25, 0.5, 0.75)],
        *[Move(f"distill width {w}", student(w)) for w in (0.5, 0.25)],
        Move("onnx fp32", lambda m: to_onnx(m, sample=data.val), finishing=True, objectives=speed),
        Move("int8-static (onnxruntime)", q("int8-static", "onnxruntime"), finishing=True),
        Move("int8-dynamic (onnxruntime)", q("int8-dynamic", "onnxruntime"), finishing=True),
        Move("int8-static (torch)", q("int8-static", "torch"), finishing=True),
        # bf16 only where the CPU computes it (AMX-BF16 / AVX-512 BF16): elsewhere it is a storage format
        *([Move("bf16 (torch)", lambda m: quantize(m, "bf16", compute="half"), finishing=True, objectives=speed)]
          if computes("bf16") else []),
        Move("codebook:5", lambda m: quantize(m, "codebook:5", data=data, epochs=1, device=device), finishing=True,
             objectives=("bytes",)),
    ]
