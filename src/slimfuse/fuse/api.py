"""``slimfuse.ensemble(members, method, data)``: combine trained models into one module."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn

from .. import configs, devices
from ..data import Split, Splits
from ..data.feed import is_split_dict, splits_of, take
from ..errors import ConfigError
from ..models.keras import torch_of
from ..models.spec import attach, lineage_of, lineage_str, spec_of, task_of
from ..train import predict, probe
from ..validate import check
from . import select
from .combine import Ensemble, make
from .stacking import blend_oof, fit_meta, with_validation


def member_probas(members, split: Split | torch.Tensor, device: str | torch.device | None = None) -> np.ndarray:
    """Cached member predictions: probabilities (K, N, C) as float64 (each member run on ``device``)."""
    return np.stack([predict(m, split, output="proba", device=device).double().numpy() for m in members])


def ensemble(
    members,
    method: str | configs.Ensemble = "weighted",
    data=None,
    *,
    weights=None,
    rounds: int = 25,
    metric: str = "nll",
    refine: bool = True,
    bags: int = 20,
    prior: float = 5.0,
    temperature: bool = True,
    fallback: bool = True,
    folds: int = 5,
    meta: str = "loglinear",
    meta_hidden: list[int] | None = None,
    blend: float = 1.0,
    bag: bool = False,
    seed: int = 0,
    validate: bool = True,
    device: str | torch.device | None = "cpu",
) -> Ensemble:
    """Combine trained ``members`` (any architectures, one class count) into an :class:`Ensemble`.

    ``method``: ``mean`` (optionally with fixed ``weights``), ``mean-logits``, ``vote``,
    ``weighted`` (Caruana selection on ``data.val`` predictions, ``rounds`` steps minimizing
    ``metric``, run on ``bags`` bootstrap resamples of the validation rows and averaged (``bags=0``:
    one plain run); ``refine=True`` then minimizes validation NLL over the simplex with a pull of
    ``prior`` pseudo-samples toward equal weights; ``temperature=True`` fits one temperature of the
    combined probabilities on validation NLL; members from ``train_members(..., folds=k)`` add their
    out-of-fold predictions on the training rows to the validation rows for all of this (the lineage's
    ``selected_on``); with ``fallback=True`` a ``folds``-fold cross-validation over those rows checks
    that the combination beats the best member out of sample (one-sided 95% paired test on ``metric``,
    accuracy not worse beyond noise), and when it does not, warns and returns the best member alone
    (one-hot weights, recorded in the lineage)) or
    ``stacking`` (a ``meta`` meta-learner on out-of-fold predictions: ``loglinear``, one exponent per
    member on its log-probabilities and a bias per class; ``linear``, a logistic regression on all the
    probabilities; ``mlp``. Trained on k-fold out-of-fold rows plus the members' own predictions on
    ``data.val`` when ``members`` come from ``train_members(..., folds=k)``, else on the ``blend``
    fraction of ``data.val``; the meta-learner is applied to the members, or with k-fold members and
    ``bag=True`` to the k x K fold models, each member's probabilities averaged over its k fold
    models: the predictions it was trained on, at k times the inference cost, which measured no
    clear gain (BENCHMARKS.md)). Members are never refitted or mutated.
    The fitted weights are on ``ens.weights`` (members with zero weight are dropped) and in
    the lineage; stacking's meta-training provenance is ``ens.oof``. ``validate``: check the
    ensemble (it must agree with at least one member, and save -> load -> rerun bit-exactly;
    :mod:`slimfuse.validate`) before returning it; ``False`` skips it (recorded in the lineage).
    ``device``: where the members run for their validation predictions (:func:`slimfuse.devices.resolve`;
    members that run on the CPU only stay there); the ensemble comes back on the CPU.

    ``data``: Splits, or labelled validation data of any form :func:`slimfuse.data.feed.feed` reads
    (a DataLoader of tuple or dict batches, arrays ...), or a dict ``{"val": ..., "test": ...}`` of
    such. Weight fitting, temperature, the fallback check and stacking work on cached member
    predictions over all of the validation data, so such data is read into memory once (under the
    memory budget, ``DataError`` beyond it) and used as the validation split.
    """
    members = torch_of(members)
    if isinstance(method, configs.Ensemble):  # the config; the keywords are its shorthand
        return ensemble(members, data=data, weights=weights, meta_hidden=meta_hidden, seed=seed, **method.model_dump())
    configs.Ensemble.build(method=method, rounds=rounds, metric=metric, refine=refine, meta=meta, blend=blend, bag=bag,
                           bags=bags, prior=prior, temperature=temperature, fallback=fallback, folds=folds,
                           validate=validate)  # the one set of names and bounds
    devices.resolve(device)  # a device that is not there: refused before any work
    if isinstance(members, nn.Module) or not hasattr(members, "__iter__"):
        raise ConfigError("members must be a list of trained modules")
    members_list = list(members)
    if not members_list or not all(isinstance(m, nn.Module) for m in members_list):
        raise ConfigError("members must be a non-empty list of nn.Module")
    if (method == "stacking" or (method == "weighted" and weights is None)) and data is None:
        raise ConfigError(f"method {method!r} learns from validation predictions; pass data= (or method='mean')")
    if data is not None and not isinstance(data, Splits):
        data = _as_splits(data, members_list)
    classes = _classes(members_list, data)
    members_list = [copy.deepcopy(m).eval() for m in members_list]  # the inputs stay untouched
    step: dict = {"method": method, "members": [lineage_str(lineage_of(m)) for m in members_list]}
    extra: dict = {}
    if method == "weighted" and weights is None:
        probas = member_probas(members_list, data.val, device)
        y = data.val.y.numpy()
        oof = getattr(members, "oof", None)
        if oof is not None and oof.scheme == "k-fold" and oof.features.shape[1] == len(members_list) \
                and not oof.leaks():
            # k-fold members: their out-of-fold predictions on every training row join the validation rows
            # (as AutoGluon selects on out-of-fold predictions), so weights and the check see N_train more
            # held-out rows than the small validation split alone
            probas = np.concatenate([oof.features.transpose(1, 0, 2), probas], axis=1)
            y = np.concatenate([oof.y, y])
            step["selected_on"] = {"out_of_fold_rows": len(oof.y), "validation_rows": len(data.val)}

        def fit_weights(p, t):
            return select.select(p, t, rounds=rounds, metric=metric, bags=bags, refine_nll=refine, prior=prior,
                                 temperature=temperature, seed=seed)

        sel = fit_weights(probas, y)
        checked = None
        if fallback and len(members_list) > 1:
            checked = select.check(probas, y, fit_weights, metric=metric, folds=folds, seed=seed)
            if not checked.beats:
                nll_iv = checked.nll
                warnings.warn(
                    f"ensemble 'weighted': no combination beats the best member (member {checked.best}) with "
                    f"confidence on held-out validation folds (NLL difference {nll_iv.diff:+.4f}, 90% interval "
                    f"[{nll_iv.lo:+.4f}, {nll_iv.hi:+.4f}]); returning the best member alone (one-hot weights)",
                    UserWarning, stacklevel=2)
                w = np.zeros(len(members_list))
                w[checked.best] = 1.0
                sel = select.Selection(w, metric, select.METRICS[metric](probas[checked.best], y))
        step.update(weights=[round(float(w), 6) for w in sel.weights], rounds=rounds, metric=metric,
                    best_round=sel.best_round, refined=sel.refined, val_loss=round(sel.loss, 6), bags=bags,
                    prior=prior, temperature=round(sel.temperature, 6))
        if checked is not None:
            step.update(check=checked.to_dict(), fallback=not checked.beats)
        keep = [i for i, w in enumerate(sel.weights) if w > 0]
        ens = make([members_list[i] for i in keep], "weighted", classes=classes, weights=sel.weights[keep],
                   temperature=sel.temperature)
        extra = {"selection": sel, "kept": keep, "check": checked}
    elif method == "stacking":
        oof = getattr(members, "oof", None)
        fold_sets = getattr(members, "fold_models", None)
        if oof is None:
            oof = blend_oof(members_list, data, trained_on=getattr(members, "trained_on", None), blend=blend, seed=seed,
                            device=device)
        elif oof.scheme == "k-fold" and len(data.val) and not (bag and fold_sets):
            n_oof = len(oof.y)  # the refitted members' validation predictions join the fold models' rows
            oof = with_validation(oof, members_list, data, getattr(members, "trained_on", None), device)
            step["meta_rows"] = {"out_of_fold_rows": n_oof, "validation_rows": len(data.val)}
        net, meta_spec = fit_meta(oof, classes, kind=meta, hidden=meta_hidden, seed=seed)
        step.update(scheme=oof.scheme, meta=meta_spec)
        if bag and oof.scheme == "k-fold" and fold_sets:
            runs = [copy.deepcopy(m).eval() for fold in fold_sets for m in fold]
            step["bag"] = len(fold_sets)
            ens = make(runs, "stacking", classes=classes, meta=net, meta_spec=meta_spec, bag=len(fold_sets))
        else:
            ens = make(members_list, "stacking", classes=classes, meta=net, meta_spec=meta_spec)
        extra = {"oof": oof}
    else:
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            step["weights"] = [round(float(v), 6) for v in np.ravel(w)]
        kind = "weighted" if method == "weighted" else method
        ens = make(members_list, kind, classes=classes, weights=weights)
    for key, value in extra.items():
        object.__setattr__(ens, key, value)
    task = (data.task.to_dict() if data is not None else None) or task_of(members_list[0])
    attach(ens, spec_of(ens), lineage=[{"op": "ensemble", "params": step}], task=task)
    return check(ens.eval(), f"ensemble({method})", reference=members_list, data=data, validate=validate,
                 fix="another method=, or leave out the member that fails on its own")


def _classes(members: list[nn.Module], data: Splits | None) -> int:
    """The one class count all members predict; a clear error when they disagree."""
    counts = []
    for i, m in enumerate(members):
        if data is not None:
            sample = take(data.val.x if len(data.val) else data.train.x, slice(0, 2))
            out = probe(m, sample, who=f"member {i}")
            counts.append(int(out.shape[-1]))
        else:
            counts.append(_declared_classes(m, i))
    if len(set(counts)) > 1:
        desc = ", ".join(f"member {i}: {c}" for i, c in enumerate(counts))
        raise ConfigError(f"ensemble members predict different numbers of classes ({desc}); "
                          "every member must predict the same classes")
    if data is not None and counts[0] != data.task.num_classes:
        raise ConfigError(f"the members predict {counts[0]} classes but the data has {data.task.num_classes}")
    return counts[0]


def _as_splits(data, members: list[nn.Module]) -> Splits:
    """User validation data (any form) read into memory as the validation split, or a dict of split
    names (``"val"``, with ``"train"`` / ``"test"`` optional)."""
    return splits_of(data if is_split_dict(data) else {"val": data}, needs=("val",), where="the ensemble's data",
                     classes=lambda x: probe(members[0], x, who="member 0").shape[-1])


def _declared_classes(m: nn.Module, i: int) -> int:
    task = task_of(m)
    if task and task.get("num_classes"):
        return int(task["num_classes"])
    args = (spec_of(m) or {}).get("args", {})
    if isinstance(args.get("classes"), int):
        return args["classes"]
    stated = getattr(m, "slimfuse_classes", None)  # an ONNX Runtime member: its graph's output shape
    if callable(stated) and (count := stated()):
        return int(count)
    last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    if last:
        return last[-1].out_features
    raise ConfigError(f"cannot tell how many classes member {i} predicts; pass data= so it can be run")
