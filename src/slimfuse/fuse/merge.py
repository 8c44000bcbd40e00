"""``slimfuse.merge``: fuse several models into one network of the same size, verified.

An ensemble of k models costs k forward passes; a merge costs one. Two families:

- **Fine-tunes of one base** (``base=``): the *task vector* of a member is its weights minus the
  base's. ``task-arithmetic`` adds ``scale`` times their sum to the base (Ilharco et al., 2023);
  ``ties`` trims each task vector to its ``density`` largest-magnitude entries, elects a sign per
  entry (the sign of the trimmed sum) and averages only the entries that agree (Yadav et al.,
  2023); ``dare`` drops each entry with probability ``drop`` and rescales the rest by
  ``1 / (1 - drop)`` before task arithmetic (Yu et al., 2024); ``dare-ties`` uses DARE's dropping
  in place of TIES' trimming. ``uniform`` and ``greedy`` are the soups of :mod:`.soup`; ``slerp``
  interpolates two models along the sphere, tensor by tensor.
- **Independently trained models** (``rebasin``): hidden units of every member are permuted to
  match a reference member (the best on validation data) by *weight matching* (Ainsworth et al.,
  2023: coordinate descent over layers, each a linear assignment) or *activation matching*
  (correlation of hidden activations); the aligned weights are averaged, BatchNorm statistics
  recomputed, and REPAIR (Jordan et al., 2023) rescales every hidden channel of the average so
  its mean and standard deviation are the members' average again.

Scaling coefficients (``scale``, SLERP's ``t``) left at ``None`` are chosen on ``data.val``.
With ``data``, every merge is verified on ``data.test`` against the best member (chosen on
validation) and the mean ensemble of the same members: accuracy and NLL, with paired bootstrap
intervals of the difference to the best member (:func:`slimfuse.stats.paired_bootstrap`; the verdict
``better``/``worse``/``tie`` of :func:`slimfuse.stats.verdict`), bytes, parameters, and batch-1
latency of the merged model beside the ensemble's, on the machine named with it. The verdict is in
the lineage step (so in the card) and on ``merged.verification``; a merge worse than the best
member beyond noise warns, and with ``fallback="distill"`` the ensemble is distilled into one model
of the members' architecture (initialised from the best member) instead.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn

from .. import configs, devices, stats
from ..compress.distill import distill
from ..data import Split, Splits
from ..data.feed import splits_of, take
from ..errors import ConfigError
from ..hardware import summary as hardware_summary
from ..measure import artifact_bytes, counts, median_seconds
from ..models.keras import torch_of
from ..models.spec import derive, lineage_of
from ..train import evaluate, predict, probe
from ..validate import check
from . import rebasin
from .combine import Ensemble
from .soup import check_same_shapes, refresh_bn, soup, train_or_val

METHODS = ("rebasin", "uniform", "greedy", "task-arithmetic", "ties", "dare", "dare-ties", "slerp")
BASE_METHODS = ("task-arithmetic", "ties", "dare", "dare-ties")
# scale grids searched on data.val: task-arithmetic and dare add task vectors (sums), ties and
# dare-ties average the agreeing entries (means)
SUM_SCALES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MEAN_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
SLERP_TS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
EPS = 1e-8


def merge(
    models,
    method: str = "rebasin",
    data: Splits | dict | None = None,
    base: nn.Module | None = None,
    *,
    scale: float | None = None,
    density: float = 0.2,
    drop: float = 0.5,
    t: float | None = None,
    matching: str | None = None,
    repair: bool | None = None,
    fallback: str | None = None,
    distill_epochs: int = 10,
    max_samples: int = 2000,
    seed: int = 0,
    validate: bool = True,
    device: str | torch.device | None = "cpu",
) -> nn.Module:
    """Merge ``models`` (one architecture) into one module of that architecture; never mutates them.

    ``method``: ``rebasin`` (align + average, for independently trained models), ``uniform``,
    ``greedy`` (soups), ``task-arithmetic``, ``ties``, ``dare``, ``dare-ties`` (need ``base``),
    ``slerp`` (two models, ``t`` = weight of the second). ``scale``: the task-vector coefficient
    (``None``: chosen on ``data.val``; without data 1/k for the sums, 1 for TIES' means).
    ``density``: fraction of each task vector TIES keeps; ``drop``: DARE's drop probability.
    ``matching``: ``weights`` or ``activations`` (needs data); ``repair`` renormalises the aligned
    average. Left unset, with data, every combination is built and the one most accurate on
    ``data.val`` kept (``chosen_by`` in the lineage step); without data, weight matching alone.
    ``fallback="distill"``: a merge worse than the best member is replaced by the
    mean ensemble distilled (``distill_epochs``) into the best member's architecture. Activation
    statistics use at most ``max_samples`` training samples; ``seed`` fixes DARE and the samples.
    ``validate``: the result passes :func:`slimfuse.validate.check` (it runs, is finite, agrees with
    at least one member, reloads bit-exactly) or ``merge`` raises; ``False`` skips it (recorded).
    ``device``: where the distillation of ``fallback="distill"`` runs (:func:`slimfuse.devices.resolve`);
    the merge itself is arithmetic on the CPU.

    ``data``: Splits, or a dict ``{"val": ..., "test": ...}`` (plus ``"train"``, which
    ``fallback="distill"`` needs and activation statistics prefer; else they use the validation inputs)
    of data in any form :func:`slimfuse.data.feed.feed` reads (DataLoaders, Datasets, arrays), each read
    into memory under the memory budget.
    """
    models = torch_of(models)
    devices.resolve(device)  # a device that is not there: refused before any work
    models = _check(models, method, data, base, scale=scale, density=density, drop=drop, t=t, matching=matching,
                    repair=repair, fallback=fallback, distill_epochs=distill_epochs, max_samples=max_samples,
                    validate=validate)
    if data is not None:  # the dict form needs val to choose on, test to verify on, train to distill on
        data = splits_of(data, needs=("val", "test") + (("train",) if fallback == "distill" else ()),
                         where="merge's data", classes=lambda x: probe(models[0], x, who="model 0").shape[-1])
    gen = torch.Generator().manual_seed(seed)
    stats_x = None
    if data is not None:  # activation statistics: training inputs, or the validation inputs without them
        rows = train_or_val(data)
        stats_x = take(rows.x, torch.randperm(len(rows), generator=gen)[:max_samples])
    step: dict = {"method": method, "members": len(models)}
    if method in ("uniform", "greedy"):
        result = soup(models, method, data, validate=False)  # the merge's own gate below
        step["kept"] = lineage_of(result)[-1]["params"].get("kept")
        source = models[0]
    elif method == "rebasin":
        source, result, info = _rebasin(models, data, stats_x, matching=matching, repair=repair, seed=seed)
        step.update(info)
    else:
        source = base if base is not None else models[0]
        result, info = _interpolate(models, method, data, base, stats_x, scale=scale, density=density, drop=drop,
                                    t=t, seed=seed)
        step.update(info)
    result = derive(source, result.eval(), "merge", **step)
    if data is not None:
        ver = _verify(result, models, data)
        if ver["verdict"] == "worse":
            _warn_worse(method, ver, fallback)
            if fallback == "distill":  # distill validated its student
                return _distill_fallback(result, models, data, ver, epochs=distill_epochs, seed=seed, device=device)
        result = _record(result, ver)
    return check(result, f"merge({method})", reference=models, data=data, validate=validate,
                 fix="fallback='distill' with data=, method='rebasin' for independently trained models, or an "
                     "ensemble of the members")


def _warn_worse(method: str, ver: dict, fallback: str | None) -> None:
    warnings.warn(
        f"merge ({method}): test accuracy {ver['merged']['accuracy']:.4f} is below the best member's "
        f"{ver['best_member']['accuracy']:.4f} beyond noise (95% interval of the difference "
        f"[{ver['vs_best']['accuracy']['lo']:+.4f}, {ver['vs_best']['accuracy']['hi']:+.4f}]); "
        + ("distilling the ensemble instead (fallback='distill')" if fallback == "distill" else
           "the ensemble of the members or fallback='distill' keeps their accuracy"),
        UserWarning, stacklevel=3,
    )


# ----------------------------------------------------------------------------- validation


def _check(models, method, data, base, *, scale, density, drop, t, matching, repair, fallback, distill_epochs,
           max_samples, validate) -> list[nn.Module]:
    configs.Merge.build(method=method, scale=scale, density=density, drop=drop, t=t, matching=matching,
                        repair=repair, fallback=fallback, distill_epochs=distill_epochs, max_samples=max_samples,
                        validate=validate)
    if isinstance(models, nn.Module) or not hasattr(models, "__iter__"):
        raise ConfigError("merge needs a list of trained modules")
    models = list(models)
    if len(models) < 2 or not all(isinstance(m, nn.Module) for m in models):
        raise ConfigError(f"merge needs at least two nn.Module models, got {len(models)}")
    if method in BASE_METHODS:
        if base is None:
            raise ConfigError(f"merge method {method!r} works on task vectors (member - base); pass base=, the model "
                              "the members were fine-tuned from")
        if not isinstance(base, nn.Module):
            raise ConfigError(f"base must be an nn.Module, got {type(base).__name__}")
    elif base is not None:
        raise ConfigError(f"merge method {method!r} does not use base=; the task-vector methods "
                          f"({', '.join(BASE_METHODS)}) do")
    check_same_shapes(models + ([base] if base is not None else []), who="merge")
    if method == "slerp" and len(models) != 2:
        raise ConfigError(f"slerp interpolates exactly two models, got {len(models)}")
    if method == "greedy" and data is None:
        raise ConfigError("a greedy soup ranks members by validation accuracy; pass data=")
    if data is None and method == "rebasin" and (matching == "activations" or repair):
        what = "activation matching" if matching == "activations" else "REPAIR"
        raise ConfigError(f"merge: {what} measures hidden activations; pass data=")
    if fallback == "distill" and data is None:
        raise ConfigError("fallback='distill' trains on data; pass data=")
    return models


# ----------------------------------------------------------------------------- task vectors


def ties_vector(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES on one tensor: keep each task vector's ``density`` largest magnitudes (ties broken by
    position), elect the sign of their sum per entry, average the entries that agree with it."""
    return disjoint_mean([trim(tau, density) for tau in taus])


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``round(density * numel)`` (at least 1) largest magnitudes zeroed."""
    flat = tau.flatten()
    k = max(1, round(density * flat.numel()))
    keep = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(tau)


def disjoint_mean(taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election and disjoint mean of (sparsified) task vectors."""
    stack = torch.stack(taus)
    elected = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == elected) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp_min(1)


def dare_vector(tau: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE on one tensor: each entry dropped with probability ``drop``, survivors scaled by 1/(1-drop)."""
    keep = torch.rand(tau.shape, generator=generator) >= drop
    return tau * keep / (1.0 - drop)


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two tensors (flattened); linear where they are (anti)parallel or zero."""
    fa, fb = a.flatten().double(), b.flatten().double()
    na, nb = fa.norm(), fb.norm()
    if na < EPS or nb < EPS:
        return torch.lerp(a, b, t)
    cos = (fa @ fb / (na * nb)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.sin() < 1e-6:
        return torch.lerp(a, b, t)
    wa, wb = torch.sin((1 - t) * omega) / omega.sin(), torch.sin(t * omega) / omega.sin()
    return (wa * fa + wb * fb).view_as(a).to(a.dtype)


def _interpolate(models, method, data, base, stats_x, *, scale, density, drop, t, seed):
    """Task-vector methods and SLERP: the merged state for one coefficient, chosen on validation data."""
    states = [m.state_dict() for m in models]
    params = {name for name, _ in models[0].named_parameters()}
    template = base if base is not None else models[0]
    if method == "slerp":
        def build(coef):
            return {k: (slerp_tensor(states[0][k], states[1][k], coef) if k in params
                        else torch.lerp(states[0][k].float(), states[1][k].float(), coef).to(v.dtype)
                        if v.is_floating_point() else v) for k, v in states[0].items()}
        grid, default, name = SLERP_TS, 0.5, "t"
        given = t
    else:
        base_state = base.state_dict()
        gen = torch.Generator().manual_seed(seed)
        merged_tau = {}
        for k in params:
            taus = [s[k].float() - base_state[k].float() for s in states]
            if method == "ties":
                merged_tau[k] = ties_vector(taus, density)
            elif method == "dare-ties":
                merged_tau[k] = disjoint_mean([dare_vector(tau, drop, gen) for tau in taus])
            elif method == "dare":
                merged_tau[k] = sum(dare_vector(tau, drop, gen) for tau in taus)
            else:
                merged_tau[k] = sum(taus)
        buffers = {k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v)
                   for k, v in base_state.items() if k not in params}

        def build(coef):
            out = dict(buffers)
            for k in params:
                out[k] = (base_state[k].float() + coef * merged_tau[k]).to(base_state[k].dtype)
            return out
        means = method in ("ties", "dare-ties")
        grid, default, name = (MEAN_SCALES, 1.0, "scale") if means else (SUM_SCALES, 1.0 / len(models), "scale")
        given = scale

    def make(coef):
        out = copy.deepcopy(template)
        out.load_state_dict(build(coef))
        if stats_x is not None:
            refresh_bn(out, Split(stats_x, torch.zeros(len(stats_x), dtype=torch.long)))
        return out.eval()

    info: dict = {}
    if method in ("ties", "dare-ties"):
        info["density" if method == "ties" else "drop"] = density if method == "ties" else drop
    if method == "dare":
        info["drop"] = drop
    if method.startswith("dare"):
        info["seed"] = seed
    if given is not None or data is None:
        coef = given if given is not None else default
        info[name] = coef
        return make(coef), info
    scores = []
    for coef in sorted(set(grid) | {default}):
        r = evaluate(make(coef), data.val)
        scores.append((r["accuracy"], -r["nll"], coef))
    best = max(scores)
    info[name] = best[2]
    info["val_accuracy_by_" + name] = {str(c): round(a, 4) for a, _, c in sorted(scores, key=lambda s: s[2])}
    return make(best[2]), info


# ----------------------------------------------------------------------------- permutation alignment


def _rebasin(models, data, stats_x, *, matching, repair: bool | None, seed: int):
    if data is not None:
        scores = [evaluate(m, data.val) for m in models]
        ref_i = max(range(len(models)), key=lambda i: (scores[i]["accuracy"], -scores[i]["nll"]))
    else:
        ref_i = 0
    ref = models[ref_i]
    groups, skipped = rebasin.permutation_groups(ref, rebasin.trace_sample(ref, stats_x))  # errors before work
    # unset options are chosen on validation accuracy, not assumed (BENCHMARKS.md: weight matching and
    # REPAIR win on MLPs, activation matching without REPAIR on BatchNorm ResNets); ties keep the first
    matchings = [matching] if matching else (["weights", "activations"] if data is not None else ["weights"])
    repairs = [repair] if repair is not None else ([True, False] if data is not None else [False])
    trials: dict[tuple[str, bool], nn.Module] = {}
    for how in matchings:
        aligned = [copy.deepcopy(ref).eval() if i == ref_i else
                   rebasin.align(m, ref, matching=how, x=stats_x, seed=seed, groups=groups)
                   for i, m in enumerate(models)]
        average = _average(ref, aligned, stats_x)
        for fix in repairs:
            trials[how, fix] = rebasin.apply_repair(copy.deepcopy(average), aligned, stats_x, groups) if fix \
                else average
    info: dict = {}
    chosen = next(iter(trials))
    if len(trials) > 1:
        name = {k: k[0] + (" + REPAIR" if k[1] else "") for k in trials}
        val = {name[k]: evaluate(m, data.val)["accuracy"] for k, m in trials.items()}
        chosen = max(trials, key=lambda k: val[name[k]])  # max keeps the first of ties
        info["chosen_by"] = {"val_accuracy": val}
    return ref, trials[chosen], {"matching": chosen[0], "repair": chosen[1], **info, "reference": ref_i,
                                 "groups": len(groups), "units": sum(g.size for g in groups), "not_aligned": skipped}


def _average(ref: nn.Module, aligned: list[nn.Module], stats_x) -> nn.Module:
    """The mean of the aligned members' weights, BatchNorm statistics recomputed on ``stats_x``."""
    states = [m.state_dict() for m in aligned]
    out = copy.deepcopy(ref)
    out.load_state_dict({k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point()
                             else v) for k, v in states[0].items()})
    out.eval()
    if stats_x is not None:
        refresh_bn(out, Split(stats_x, torch.zeros(len(stats_x), dtype=torch.long)))
        out.eval()
    return out


# ----------------------------------------------------------------------------- verification


def _interval(a: np.ndarray, b: np.ndarray) -> dict:
    iv = stats.paired_bootstrap(a, b)
    return {"diff": round(iv.diff, 6), "lo": round(iv.lo, 6), "hi": round(iv.hi, 6), "level": iv.level}


def _per_sample(proba: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    s = stats.per_sample(proba.double().clamp_min(1e-12).log(), y)
    return s["correct"].astype(np.float64), s["nll"]


def _summary(correct: np.ndarray, nll: np.ndarray) -> dict:
    return {"accuracy": round(float(correct.mean()), 6), "nll": round(float(nll.mean()), 6)}


def _latency(merged: nn.Module, models: list[nn.Module], x: torch.Tensor, classes: int) -> dict:
    """Batch-1 median latency (ms) of the merged model and of the mean ensemble of the members,
    interleaved in three rounds so load drift hits both alike; the machine is named in ``hardware``."""
    ens = Ensemble(list(models), "mean", classes=classes).eval()
    one = x[:1].contiguous()
    rounds: dict[str, list[float]] = {"merged": [], "ensemble": []}
    with torch.inference_mode():
        for _ in range(3):
            for name, m in (("merged", merged), ("ensemble", ens)):
                rounds[name].append(median_seconds(m, one, runs=30) * 1e3)
    ms = {k: round(float(np.median(v)), 4) for k, v in rounds.items()}
    return {"batch": 1, "merged_ms": ms["merged"], "ensemble_ms": ms["ensemble"],
            "speedup": round(ms["ensemble"] / max(ms["merged"], 1e-9), 2), "hardware": hardware_summary()}


def _verify(merged: nn.Module, models: list[nn.Module], data: Splits) -> dict:
    """The merged model beside the best member (chosen on validation) and the mean ensemble, on test."""
    test = data.test
    val = [evaluate(m, data.val) for m in models]
    best = max(range(len(models)), key=lambda i: (val[i]["accuracy"], -val[i]["nll"]))
    member_p = [predict(m, test, output="proba") for m in models]
    rows = [_per_sample(p, test.y) for p in member_p]
    ens = _per_sample(torch.stack(member_p).mean(0), test.y)
    got = _per_sample(predict(merged, test, output="proba"), test.y)
    vs = {"accuracy": _interval(got[0], rows[best][0]), "nll": _interval(got[1], rows[best][1])}
    verdict = stats.verdict(stats.Interval(vs["accuracy"]["diff"], vs["accuracy"]["lo"], vs["accuracy"]["hi"]))
    one = artifact_bytes(merged)
    return {
        "split": "test", "samples": len(test),
        "merged": _summary(*got),
        "best_member": {"index": best, **_summary(*rows[best])},
        "ensemble": {"method": "mean", **_summary(*ens)},
        "members": [_summary(*r) for r in rows],
        "vs_best": vs,
        "verdict": verdict,
        "params": {"merged": counts(merged)["params"], "ensemble": sum(counts(m)["params"] for m in models)},
        "bytes": {"merged": one, "ensemble": sum(artifact_bytes(m) for m in models)},
        "latency": _latency(merged, models, test.x, data.task.num_classes),
    }


def _record(model: nn.Module, ver: dict) -> nn.Module:
    meta = model.slimfuse
    meta["lineage"][-1]["params"]["verification"] = ver
    object.__setattr__(model, "verification", ver)
    return model


def _distill_fallback(merged: nn.Module, models, data: Splits, ver: dict, *, epochs: int, seed: int,
                      device) -> nn.Module:
    from .api import ensemble

    teacher = ensemble(models, "mean", data)
    best = models[ver["best_member"]["index"]]
    student = distill(teacher, copy.deepcopy(best), data, epochs=epochs, seed=seed, progress=False, device=device)
    after = _verify(student, models, data)
    ver = dict(ver, fallback={"method": "distill", "epochs": epochs, **{k: after[k] for k in ("merged", "vs_best",
                                                                                                  "verdict")}})
    merge_step = lineage_of(merged)[-1]
    merge_step["params"]["verification"] = ver
    lineage = lineage_of(merged)[:-1] + [merge_step, lineage_of(student)[-1]]
    meta = student.slimfuse
    meta["lineage"] = lineage
    object.__setattr__(student, "verification", ver)
    return student.eval()


__all__ = ["METHODS", "dare_vector", "disjoint_mean", "merge", "slerp_tensor", "ties_vector", "trim"]
