"""Weight-space fusion: model soups and stochastic weight averaging (SWA).

A soup averages the weights of models fine-tuned from one shared initialization
(Wortsman et al., 2022): ``uniform`` averages all of them; ``greedy`` adds
ingredients in order of validation accuracy and keeps each one only if the soup's
validation accuracy does not drop. Averaging only works inside one loss basin:
a soup far worse than its ingredients gets a warning naming that cause.
BatchNorm statistics are recomputed for the averaged weights (``refresh_bn``).

``data`` may be Splits or data of any form :func:`slimfuse.data.feed.feed` reads (a ``DataLoader``
of tuple or dict batches, a ``Dataset``, arrays): for a soup, the labelled validation data the
ingredients are ranked on, whose inputs also refresh BatchNorm when there is no training split;
for SWA, the training data, as :func:`slimfuse.fit` takes it (``val=`` its validation data).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..data import Split, Splits
from ..data.feed import feed, take
from ..errors import ConfigError, DataError
from ..models.calling import forward
from ..models.keras import torch_of
from ..models.spec import derive, spec_of
from ..train import evaluate, fit
from ..validate import check

# a soup this much less accurate than its mean ingredient is "far worse"
FAR_WORSE = 0.05


def soup(models: list[nn.Module], method: str = "greedy", data=None, *, validate: bool = True) -> nn.Module:
    """Average the weights of ``models`` (same architecture, shared initialization).

    ``data``: Splits (ranked on ``val``, BatchNorm refreshed on ``train``) or labelled validation
    data of any form (ranked on it, streamed; BatchNorm refreshed on its inputs, labels unused).

    ``validate``: check the soup against its ingredients before returning it (it must agree with
    at least one; :mod:`slimfuse.validate`); ``False`` skips it (recorded in the lineage)."""
    models = torch_of(models)
    if method not in ("uniform", "greedy"):
        raise ConfigError(f"unknown soup method {method!r}; choose uniform or greedy")
    models = list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise ConfigError("soup needs a non-empty list of nn.Module")
    check_same_shapes(models)
    if method == "greedy" and data is None:
        raise ConfigError("a greedy soup ranks ingredients by validation accuracy; pass data=")
    train, val = (train_or_val(data), data.val) if isinstance(data, Splits) else (data, data)
    if method == "uniform":
        result = average(models, train)
        kept = list(range(len(models)))
    else:
        accs = [evaluate(m, val)["accuracy"] for m in models]
        order = sorted(range(len(models)), key=lambda i: -accs[i])
        kept = [order[0]]
        result, best = copy.deepcopy(models[order[0]]), accs[order[0]]
        for i in order[1:]:
            trial = average([models[j] for j in kept + [i]], train)
            acc = evaluate(trial, val)["accuracy"]
            if acc >= best:
                kept, result, best = kept + [i], trial, acc
        if len(kept) == 1 and len(models) > 1:
            _warn_if_far_worse(average(models, train), models, val)
    if method == "uniform" and data is not None:
        _warn_if_far_worse(result, models, val)
    result = derive(models[0], result.eval(), "soup", method=method, ingredients=len(models), kept=kept)
    return check(result, f"soup({method})", reference=models, data=data, validate=validate,
                 fix="method='greedy' with data=, or ingredients fine-tuned from one initialization")


def train_or_val(data: Splits):
    """The split whose inputs refresh BatchNorm or give activation statistics: the training data, or the
    validation data when there is none (Splits read from a dict of validation and test data)."""
    return data.train if len(data.train) else data.val


def check_same_shapes(models: list[nn.Module], who: str = "soup") -> None:
    first = models[0].state_dict()
    for i, m in enumerate(models[1:], start=1):
        state = m.state_dict()
        if state.keys() != first.keys():
            missing = sorted(set(first) ^ set(state))[:3]
            raise ConfigError(f"{who}: model {i} has different tensors than model 0 (e.g. {missing}); "
                              "weights can only be averaged across one architecture")
        for k, v in state.items():
            if v.shape != first[k].shape:
                raise ConfigError(f"{who}: tensor {k!r} is {tuple(v.shape)} in model {i} but "
                                  f"{tuple(first[k].shape)} in model 0; "
                                  "weights can only be averaged across one architecture")
    if spec_of(models[0]) is not None and any(spec_of(m) != spec_of(models[0]) for m in models):
        raise ConfigError(f"{who}: the models have different architecture specs")


def average(models: list[nn.Module], train=None) -> nn.Module:
    """Uniform weight average (integer buffers from the first model); BatchNorm refreshed on ``train``."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    avg = {k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v)
           for k, v in states[0].items()}
    out.load_state_dict(avg)
    if train is not None:
        refresh_bn(out, train)
    return out.eval()


class _Calls(nn.Module):
    """``model`` called by slimfuse's convention (``model(x)``, ``model(*x)``, ``model(**x)``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return forward(self.model, x)


def refresh_bn(model: nn.Module, data, *, batch_size: int = 256) -> nn.Module:
    """Recompute BatchNorm running statistics of ``model`` (in place) with one pass over ``data``: a
    Split, or inputs of any form :func:`slimfuse.data.feed.feed` reads (labels, if any, unused).

    ``torch.optim.swa_utils.update_bn``: a cumulative average over the pass, then each layer's own
    momentum and the model's training mode restored. A model without BatchNorm is left as it is,
    its data unread."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if isinstance(data, Split):
        inputs = (take(data.x, slice(start, start + batch_size)) for start in range(0, len(data), batch_size))
    else:  # streamed: one batch in memory at a time
        inputs = (b[0] for b in feed(data, batch_size=batch_size, labels=None, where="the BatchNorm data"))
    read = 0

    def wrapped():  # 1-tuples: update_bn takes a tuple's first element as the input
        nonlocal read
        for x in inputs:
            read += 1
            yield (x,)

    training = model.training
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(wrapped(), _Calls(model))
    if not read:  # update_bn has left the reset statistics (mean 0, variance 1)
        raise DataError("no inputs to recompute BatchNorm statistics on (the data is empty)")
    return model.train(training)


def _warn_if_far_worse(result: nn.Module, models: list[nn.Module], val) -> None:
    accs = [evaluate(m, val)["accuracy"] for m in models]
    got = evaluate(result, val)["accuracy"]
    mean = sum(accs) / len(accs)
    if got < mean - FAR_WORSE:
        warnings.warn(
            f"the uniform weight average reaches {got:.3f} validation accuracy against {mean:.3f} for its "
            "ingredients: the models do not share a loss basin (not fine-tuned from one shared "
            "initialization), so averaging their weights fails; combine their outputs with "
            "slimfuse.ensemble instead",
            UserWarning,
            stacklevel=3,
        )


def swa(model: nn.Module, data, *, epochs: int = 10, start: float = 0.5, swa_lr: float | None = None,
        validate: bool = True, **fit_options) -> nn.Module:
    """Train a copy of ``model`` with stochastic weight averaging (Izmailov et al., 2018).

    The first ``start`` fraction of ``epochs`` trains as :func:`slimfuse.fit` would; the rest runs
    at a constant ``swa_lr`` (default: ``lr``), averaging the weights at the end of every epoch.
    BatchNorm statistics are then recomputed for the averaged weights, on the training inputs.
    ``data``: Splits or training data of any form :func:`slimfuse.fit` takes (``val=`` in
    ``fit_options``: its validation data).
    """
    model = torch_of(model)
    if not 0 <= start < 1:
        raise ConfigError(f"swa: start must be a fraction in [0, 1), got {start}")
    first = round(epochs * start)
    if epochs - first < 1:
        raise ConfigError(f"swa: no epoch left to average (epochs={epochs}, start={start})")
    fit_options.setdefault("progress", False)
    fit_options.pop("op", None)
    lr = fit_options.pop("lr", 1e-3)
    swa_lr = swa_lr or lr
    warm = fit(model, data, epochs=first, lr=lr, op=None, **fit_options) if first else model
    averaged = torch.optim.swa_utils.AveragedModel(copy.deepcopy(warm), use_buffers=False)
    fit_options.pop("schedule", None)
    fit(warm, data, epochs=epochs - first, lr=swa_lr, op=None,
        on_epoch_end=lambda m, row: averaged.update_parameters(m), **fit_options)
    result = copy.deepcopy(warm)
    result.load_state_dict(averaged.module.state_dict())
    refresh_bn(result, data.train if isinstance(data, Splits) else data)
    result = derive(model, result.eval(), "swa", epochs=epochs, start=start, lr=lr, swa_lr=swa_lr)
    return check(result, "swa", reference=model, data=data, validate=validate, fix="a lower swa_lr= or a later start=",
                 floor=0.0)  # SWA trains the model further (from scratch, even): only a collapse is an error
