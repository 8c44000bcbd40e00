"""``slimfuse.prune``: magnitude pruning that is really sparse, channel pruning that really shrinks.

Unstructured (``sparsity=``): the weights of the Linear/Conv layers in scope whose
magnitude is smallest become real zeros, exactly ``round(sparsity * n)`` of them
(ties broken by position, so the result is deterministic). ``schedule="agp"`` is
Zhu & Gupta's gradual pruning: while fine-tuning through ``slimfuse.train.fit``,
the sparsity rises along ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3`` over
``steps`` pruning steps spread across the first half of the fine-tuning, and the
masks are re-applied after every optimizer step so pruned weights stay zero. The
result asks for the ``sparse-zstd`` storage codec, so its artifact is really
smaller.

Structured (``channels=``): whole neurons/channels are removed with Torch-Pruning's
dependency graph (residual additions, concatenations and flatten->linear stay
consistent), in ``steps`` steps with fine-tuning between them. The layers
physically shrink; the new widths go into the zoo spec, or, for any other model,
into a registered ``pruned`` architecture that rebuilds the shrunk shapes from the
base spec, so the artifact reloads without unpickling.

By default the output layer (the last Linear/Conv to run in a forward pass) is
excluded: pruning it removes classes (structured) or costs accuracy for few bytes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import configs, devices
from ..checkpoint import Area, Resume, fingerprint, run_key
from ..data import Splits
from ..data.feed import feed
from ..errors import ConfigError
from ..models import hf
from ..models.calling import forward, select
from ..models.conv1d import Conv1DPruner
from ..models.keras import torch_of
from ..models.shrunk import (
    PRUNABLE,
    TP_ERRORS,
    check_still_runs,
    output_layers,
    shrunk_spec,
    tp_failure,
)
from ..models.spec import derive, task_of
from ..train import fit, probe
from ..validate import check
from .sparse import CODEC

DEFAULT_FINETUNE_EPOCHS = 8
DEFAULT_LR = {"sparsity": 1e-3, "channels": 3e-3}  # Adam; a shrunk network recovers faster at 3e-3 (BENCHMARKS.md)
AGP_PRUNING_SPAN = 0.5  # fraction of the fine-tuning during which the sparsity rises (measured: BENCHMARKS.md)
AGP_STEPS = 5
MAX_LAYER_SPARSITY = 0.98  # unstructured: no layer loses more of its weights (a global threshold could empty one)

StepCallback = Callable[[dict], None]


def prune(
    model: nn.Module,
    sparsity: float | configs.Prune | None = None,
    *,
    channels: float | None = None,
    scope: str | None = None,
    schedule: str = "agp",
    steps: int | None = None,
    importance: str | None = None,
    round_to: int | None = None,
    embeddings: bool = False,
    data=None,
    epochs: int | None = None,
    exclude: list[str] | None = None,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool | None = None,
    on_step: StepCallback | None = None,
    checkpoint: str | Path | None = None,
    max_layer_sparsity: float = MAX_LAYER_SPARSITY,
    validate: bool = True,
    device: str | torch.device | None = "cpu",
) -> nn.Module:
    """Prune a copy of ``model``; pass exactly one of ``sparsity`` and ``channels`` (or a
    :class:`slimfuse.configs.Prune` as ``sparsity``, of which the keywords are a shorthand).

    ``sparsity``: fraction of weights in scope set to zero (unstructured). ``scope``:
    ``global`` (one magnitude threshold across layers, default) or ``layer`` (each layer
    pruned to ``sparsity``). ``schedule``: ``agp`` (gradual, needs fine-tuning) or
    ``oneshot``. ``steps``: pruning steps (default 5 for agp).

    ``channels``: fraction of channels/neurons removed from each prunable layer
    (``scope="layer"``, default) or across the network (``scope="global"``). ``importance``:
    ``l1`` (default), ``l2`` or ``taylor`` (first-order, needs ``data``). ``steps``: pruning
    steps with fine-tuning between them (default 1). ``round_to``: keep widths multiples of it.
    ``embeddings`` (a ``transformers`` model): also narrow its embedding dimension, the residual stream
    every block reads and writes (embeddings, LayerNorms, the pooler), by the same fraction; by default
    it keeps the config's ``hidden_size``. Other models' residual streams are pruned with their layers.

    ``data``: the ``Splits`` fine-tuning trains on, or data of any form :func:`slimfuse.data.feed.feed`
    reads (a ``DataLoader`` of tuple or dict batches, a ``Dataset``, arrays ``(X, y)``): streamed by
    :func:`slimfuse.fit`, its first samples the example inputs for tracing and the validation gate's
    sample; ``checkpoint`` then is refused (resuming needs Splits). ``epochs``: total fine-tuning
    budget (default 8 when ``data`` is given, else 0). ``exclude``: module names never pruned
    (default: the output layer). ``lr`` (default 1e-3 unstructured, 3e-3 structured: measured,
    see BENCHMARKS.md), ``batch_size``, ``seed``: fine-tuning settings (Adam, cosine schedule).
    ``on_step(info)`` is called after every pruning step.

    ``checkpoint`` (a folder): the fine-tuning state (weights, optimizer, masks and position in
    the pruning schedule; structured: every finished step) is saved there after every epoch,
    and a rerun with the same arguments resumes from it, reaching the same weights as an
    uninterrupted run. A checkpoint of other arguments is replaced (with a warning); the folder
    is removed when pruning completes.

    ``max_layer_sparsity`` (unstructured, default 0.98): no layer loses more than this fraction
    of its weights (and every layer keeps at least one), so a global threshold never removes a
    layer whose weights are all small; the zeros a capped layer cannot take go to the others.
    ``validate``: check the result (crash, NaN, collapse, bit-exact reload; see
    :mod:`slimfuse.validate`) before returning it; ``False`` skips it (recorded in the lineage).
    ``device``: where fine-tuning runs (:func:`slimfuse.devices.resolve`); tracing and the pruning steps
    run on the CPU, and the result comes back there.
    """
    model = torch_of(model)
    if isinstance(sparsity, configs.Prune):
        return prune(model, data=data, seed=seed, progress=progress, on_step=on_step, checkpoint=checkpoint,
                     **sparsity.given())
    devices.resolve(device)  # a device that is not there: refused before any work
    given = {"sparsity": sparsity, "channels": channels, "scope": scope, "schedule": schedule, "steps": steps,
             "importance": importance, "round_to": round_to, "exclude": exclude, "epochs": epochs, "lr": lr,
             "embeddings": embeddings or None,
             "batch_size": batch_size, "max_layer_sparsity": max_layer_sparsity}
    configs.Prune.build(**{k: v for k, v in given.items() if v is not None})  # one set of names and bounds
    kind = "sparsity" if sparsity is not None else "channels"
    amount = float(sparsity if sparsity is not None else channels)
    if kind == "sparsity" and amount > max_layer_sparsity:
        raise ConfigError(f"sparsity={amount} is above max_layer_sparsity={max_layer_sparsity}: no layer may "
                          "lose more than that; raise max_layer_sparsity (below 1) or ask for less sparsity")
    if epochs is None:
        epochs = DEFAULT_FINETUNE_EPOCHS if data is not None else 0
    if epochs and data is None:
        raise ConfigError(f"fine-tuning for {epochs} epochs needs data: pass data= (Splits), "
                          "or epochs=0 to prune without fine-tuning")
    if data is not None and not isinstance(data, Splits):
        if checkpoint is not None:
            raise ConfigError("checkpoint= needs in-memory data (slimfuse Splits): a streamed source's content and "
                              "order cannot be fingerprinted for a bit-exact resume")
        data = feed(data, batch_size=batch_size, where="the pruning data")
    sample = _sample(model, data)
    if sample is not None:
        probe(model, sample)  # a model that cannot take the data's inputs: one clear error before any tracing
    if lr is None:
        lr = DEFAULT_LR[kind]
    fit_kw = {"lr": lr, "batch_size": batch_size, "seed": seed, "progress": progress, "schedule": "cosine",
              "device": device}
    on_step = on_step or (lambda info: None)
    if kind == "sparsity":
        result = _unstructured(model, amount, scope=scope or "global", schedule=schedule, steps=steps, data=data,
                               epochs=epochs, exclude=exclude, fit_kw=fit_kw, on_step=on_step,
                               checkpoint=checkpoint, max_layer=float(max_layer_sparsity))
        fix = "scope='layer', a lower sparsity, a lower max_layer_sparsity, or fine-tuning (data=, epochs=)"
        return check(result, f"prune(sparsity={amount})", reference=model, data=data, validate=validate, fix=fix)
    result = _structured(model, amount, scope=scope or "layer", importance=importance or "l1", steps=steps or 1,
                         round_to=round_to, data=data, epochs=epochs, exclude=exclude, fit_kw=fit_kw,
                         on_step=on_step, checkpoint=checkpoint, embeddings=embeddings)
    fix = "fewer channels, scope='layer', more steps= or fine-tuning (data=, epochs=), or exclude= the layer"
    return check(result, f"prune(channels={amount})", reference=model, data=data, validate=validate, fix=fix)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose {' or '.join(choices)}")


# --------------------------------------------------------------------------- layers in scope


def _sample(model: nn.Module, data: Splits | None) -> torch.Tensor | None:
    """Two inputs for tracing: from the data, else zeros shaped like the model's task."""
    if isinstance(data, Splits):
        return data.train.x[:2]
    if data is not None:
        return data.head(2).x
    task = task_of(model)
    if task and task.get("input_shape"):
        return torch.zeros(2, *task["input_shape"])
    return None


def _scope(model: nn.Module, exclude: list[str] | None, sample) -> tuple[dict[str, nn.Module], list[str]]:
    modules = dict(model.named_modules())
    if exclude is None:
        exclude = output_layers(model, sample)
    elif isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise ConfigError(f"exclude must be a list of module names, got {exclude!r}")
    unknown = [e for e in exclude if e not in modules]
    if unknown:
        raise ConfigError(f"exclude names modules the model does not have: {', '.join(unknown)}")
    skipped = {id(m) for e in exclude for m in modules[e].modules()}
    layers = {n: m for n, m in modules.items()
              if (isinstance(m, PRUNABLE) or hf.is_conv1d(m)) and id(m) not in skipped}  # GPT-2's Conv1D too
    return layers, list(exclude)


def _unpruned(model: nn.Module) -> str:
    """``; its RNN/Embedding layers (lstm: LSTM) are not pruned`` for the weighted layers pruning leaves alone."""
    kinds = (nn.RNNBase, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention)
    others = [f"{n}: {type(m).__name__}" for n, m in model.named_modules() if isinstance(m, kinds)]
    return f"; its {', '.join(others[:5])} layers are not pruned" if others else ""


# --------------------------------------------------------------------------- unstructured


def _keep(magnitude: torch.Tensor, zeros: int) -> torch.Tensor:
    """Boolean mask keeping all but the ``zeros`` smallest entries; ties go by position."""
    keep = torch.ones(magnitude.numel(), dtype=torch.bool)
    keep[torch.argsort(magnitude.reshape(-1), stable=True)[:zeros]] = False
    return keep


def _layer_cap(n: int, max_layer: float) -> int:
    """The most zeros a layer of ``n`` weights may get: ``max_layer`` of them, never all."""
    return max(0, min(math.floor(max_layer * n + 1e-9), n - 1))


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str,
                    max_layer: float = MAX_LAYER_SPARSITY) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing exactly ``round(sparsity * n)`` weights, globally or per layer.

    No layer gets more than ``max_layer`` of its weights zeroed (and none loses all): under the
    global threshold a layer over its cap is pruned to the cap and the rest of the zeros are
    spread over the other layers by the same global ranking, so the total stays exact when it can.
    """
    if scope == "layer":
        return {n: _keep(w.detach().abs(), min(round(sparsity * w.numel()), _layer_cap(w.numel(), max_layer)))
                .view(w.shape) for n, w in weights.items()}
    zeros = round(sparsity * sum(w.numel() for w in weights.values()))
    capped: dict[str, int] = {}  # layer -> its zeros, fixed at its cap
    while True:
        free = [n for n in weights if n not in capped]
        budget = zeros - sum(capped.values())
        if not free or budget <= 0:
            counts = dict.fromkeys(free, 0)
            break
        flat = torch.cat([weights[n].detach().abs().reshape(-1) for n in free])
        keep = _keep(flat, min(budget, flat.numel()))
        counts, start = {}, 0
        for n in free:
            k = weights[n].numel()
            counts[n] = int((~keep[start : start + k]).sum())
            start += k
        over = [n for n in free if counts[n] > _layer_cap(weights[n].numel(), max_layer)]
        if not over:
            break
        for n in over:
            capped[n] = _layer_cap(weights[n].numel(), max_layer)
    counts.update(capped)
    return {n: _keep(w.detach().abs(), counts[n]).view(w.shape) for n, w in weights.items()}


class _Masker:
    """Holds the masks of the layers in scope; raises the sparsity on schedule during ``fit``."""

    def __init__(self, names: list[str], scope: str, schedule: list[tuple[int, float]], on_step: StepCallback,
                 steps_per_epoch: int, max_layer: float = MAX_LAYER_SPARSITY):
        self.names, self.scope, self.schedule, self.on_step = names, scope, schedule, on_step
        self.max_layer = max_layer
        self.steps_per_epoch = steps_per_epoch
        self.masks: dict[str, torch.Tensor] = {}
        self.done = 0  # pruning steps taken
        self.t = 0  # optimizer steps seen

    def _weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        modules = dict(model.named_modules())
        return {n: modules[n].weight for n in self.names}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        for n, w in self._weights(model).items():
            w.masked_fill_(~self.masks[n].to(w.device), 0.0)  # +0.0, never -0.0: zeros are zeros on disk too

    @torch.no_grad()
    def advance(self, model: nn.Module, *, final: bool = False) -> None:
        """Take every pruning step due by now (all of them when ``final``), then re-apply the masks."""
        due = [s for s in self.schedule[self.done :] if final or s[0] <= self.t]
        if due:
            self.done += len(due)
            sparsity = due[-1][1]
            self.masks = magnitude_masks(self._weights(model), sparsity, self.scope, self.max_layer)
            self.on_step({"step": self.done, "steps": len(self.schedule), "sparsity": sparsity,
                          "epoch": self.t / self.steps_per_epoch})
        self.apply(model)

    def after_step(self, model: nn.Module) -> None:
        self.t += 1
        self.advance(model)

    # saved with every fine-tuning epoch's checkpoint (``Resume(state=masker)``)
    def state_dict(self) -> dict:
        return {"masks": {n: m.cpu() for n, m in self.masks.items()}, "done": self.done, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.masks, self.done, self.t = dict(state["masks"]), state["done"], state["t"]


def agp_schedule(initial: float, final: float, steps: int, total: int) -> list[tuple[int, float]]:
    """Zhu & Gupta's cubic schedule: ``steps`` (optimizer step, sparsity) pairs within the first
    ``AGP_PRUNING_SPAN`` of ``total`` optimizer steps; the first at step 0, the last at ``final``."""
    dt = max(1, int(AGP_PRUNING_SPAN * total) // steps)
    return [(j * dt, final + (initial - final) * (1 - (j + 1) / steps) ** 3) for j in range(steps)]


def _unstructured(model, sparsity, *, scope, schedule, steps, data, epochs, exclude, fit_kw, on_step, checkpoint,
                  max_layer=MAX_LAYER_SPARSITY):
    _check_choice("scope", scope, ("global", "layer"))
    _check_choice("schedule", schedule, ("agp", "oneshot"))
    if schedule == "agp" and epochs == 0:
        raise ConfigError("schedule='agp' prunes gradually while fine-tuning: pass data= (and epochs > 0), "
                          "or use schedule='oneshot'")
    if schedule == "oneshot" and steps not in (None, 1):
        raise ConfigError("schedule='oneshot' prunes in one step; steps= applies to schedule='agp'")
    work = copy.deepcopy(model)
    layers, excluded = _scope(work, exclude, _sample(work, data))
    if not layers:
        raise ConfigError(f"nothing to prune: the model has no Linear/Conv layers outside exclude={excluded}"
                          f"{_unpruned(work)}")
    n_weights = sum(m.weight.numel() for m in layers.values())
    initial = sum(int((m.weight == 0).sum()) for m in layers.values()) / n_weights
    if initial > sparsity:
        raise ConfigError(f"the layers in scope are already {initial:.4f} sparse; ask for sparsity >= that")
    if isinstance(data, Splits):
        steps_per_epoch = math.ceil(len(data.train) / fit_kw["batch_size"])
    else:
        steps_per_epoch = max(1, len(data)) if data is not None else 1
    total = epochs * steps_per_epoch
    plan = agp_schedule(initial, sparsity, steps or AGP_STEPS, total) if schedule == "agp" else [(0, sparsity)]
    masker = _Masker(list(layers), scope, plan, on_step, steps_per_epoch, max_layer)
    masker.advance(work)
    if epochs:
        resume = None if checkpoint is None else Resume(checkpoint, state=masker, key={
            "op": "prune", "sparsity": sparsity, "scope": scope, "plan": plan, "layers": list(layers),
            "max_layer": max_layer})
        work = fit(work, data, epochs=epochs, after_step=masker.after_step, op=None, checkpoint=resume, **fit_kw)
    masker.advance(work, final=True)  # steps a very short fine-tuning could not reach
    work.eval()
    object.__setattr__(work, "slimfuse_codec", CODEC)
    return derive(model, work, "prune", sparsity=sparsity, scope=scope, schedule=schedule, steps=len(plan),
                  epochs=epochs, excluded=excluded, pruned_layers=list(layers), max_layer_sparsity=max_layer)


# --------------------------------------------------------------------------- structured


def _importance(name: str):
    import torch_pruning as tp

    _check_choice("importance", name, ("l1", "l2", "taylor"))
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)


def _taylor_gradients(model: nn.Module, data: Splits, batch_size: int = 256, batches: int = 4) -> None:
    """Accumulate loss gradients over a few training batches for first-order (Taylor) importance."""
    model.zero_grad(set_to_none=True)
    if not isinstance(data, Splits):  # streamed: its first batches
        for i, (x, y) in enumerate(data):
            if i == batches:
                break
            F.cross_entropy(forward(model, x), y).backward()
        return
    for i in range(batches):
        x, y = data.train.x[i * batch_size : (i + 1) * batch_size], data.train.y[i * batch_size : (i + 1) * batch_size]
        if len(x):
            F.cross_entropy(forward(model, x), y).backward()


def _has_groups(pruner, layers) -> bool:
    """Whether the pruner found anything to remove (Torch-Pruning: a group outside the ignored layers)."""
    if isinstance(pruner, Conv1DPruner):
        return bool(pruner)
    return bool(layers) and any(True for _ in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                                       root_module_types=pruner.root_module_types))


def _epochs_per_step(epochs: int, steps: int) -> list[int]:
    """Split the fine-tuning budget over the steps; the remainder goes to the last steps."""
    base, extra = divmod(epochs, steps)
    return [base + (1 if j >= steps - extra else 0) for j in range(steps)]


def _structured(model, ratio, *, scope, importance, steps, round_to, data, epochs, exclude, fit_kw, on_step,
                checkpoint, embeddings=False):
    import torch_pruning as tp

    _check_choice("scope", scope, ("layer", "global"))
    if importance == "taylor" and data is None:
        raise ConfigError("importance='taylor' uses loss gradients: pass data=")
    work = copy.deepcopy(model).eval()
    sample = _sample(work, data)
    if sample is None:
        raise ConfigError("structured pruning traces the model with an example input: pass data=")
    layers, excluded = _scope(work, exclude, sample)
    modules = dict(work.named_modules())
    ignored = [modules[e] for e in excluded]
    with torch.no_grad():
        expected = forward(work, sample).shape
    extra, pruner = {}, None
    if embeddings and not hf.is_hf(work):
        raise ConfigError("embeddings=True narrows a transformers model's embedding dimension; other models' "
                          "residual streams are pruned with their layers already (leave it unset)")
    if hf.is_hf(work):  # attention heads go as units; the residual stream stays whole unless embeddings=True
        skipped = {id(m) for e in excluded for m in modules[e].modules()}
        odd = [n for n in hf.unknown_attention(work) if id(modules[n.split(" ")[0]]) not in skipped]
        if odd:
            raise ConfigError(f"structured pruning does not know how {odd[0]} splits its features into attention "
                              "heads, so it cannot remove whole heads; exclude= those layers "
                              f"({', '.join(o.split(' ')[0] for o in odd[:3])}{' ...' if len(odd) > 3 else ''}) "
                              "or prune with sparsity=")
        if hf.conv1d_attention(work) or hf.conv1d_mlps(work):  # GPT-2's Conv1D blocks: pruned here, not traced
            if embeddings:
                raise ConfigError("embeddings=True is not supported for GPT-2-family (Conv1D) models: their heads "
                                  "and MLP widths are pruned, their embedding dimension stays")
            pruner = Conv1DPruner(work, ratio=ratio, steps=steps, importance=importance, scope=scope,
                                  round_to=round_to, skip=skipped)
        else:
            setup = hf.pruning_setup(work, embeddings=embeddings)
            ignored += setup["ignored"]
            if setup["num_heads"]:
                extra = {"num_heads": setup["num_heads"], "prune_num_heads": True, "prune_head_dims": False,
                         "head_pruning_ratio": ratio}
    if pruner is None:
        try:
            pruner = tp.pruner.BasePruner(
                work, sample, importance=_importance(importance), pruning_ratio=ratio, iterative_steps=steps,
                ignored_layers=ignored, round_to=round_to, global_pruning=scope == "global",
                output_transform=select, **extra,
            )
        except TP_ERRORS as e:  # Torch-Pruning could not trace the graph
            raise tp_failure(e, work) from None
    if not _has_groups(pruner, layers):
        raise ConfigError(f"nothing to prune: the model has no channels outside exclude={excluded} that can be "
                          f"removed (e.g. its only Linear/Conv layer is the output layer){_unpruned(work)}")
    # A rerun replays the pruning steps; each finished step's fine-tuning is kept in the area,
    # so it returns at once with the weights the next step prunes.
    area = None
    if checkpoint is not None and epochs:
        params = {"op": "prune", "channels": ratio, "scope": scope, "importance": importance, "steps": steps,
                  "round_to": round_to, "epochs": epochs, "excluded": excluded,
                  "fit": {k: v for k, v in fit_kw.items() if k not in ("progress", "device")},
                  "data": fingerprint(data.train.x, data.train.y, data.val.x, data.val.y)}
        area = Area(checkpoint, run_key(work, params))
    for step, step_epochs in enumerate(_epochs_per_step(epochs, steps), start=1):
        if importance == "taylor":
            _taylor_gradients(work, data)
        try:
            pruner.step()
        except TP_ERRORS as e:  # a graph Torch-Pruning misreads: name the layers, never a raw traceback
            raise tp_failure(e, work, pruner) from None
        if extra:
            hf.after_pruning(work, pruner.num_heads)
        work.zero_grad(set_to_none=True)
        check_still_runs(work, sample, expected)
        if step_epochs:
            resume = Resume(area.stage(f"step-{step}"), keep=True) if area is not None else None
            tuned = fit(work, data, epochs=step_epochs, op=None, checkpoint=resume,
                        **{**fit_kw, "seed": fit_kw["seed"] + step})
            work.load_state_dict(tuned.state_dict())
        on_step({"step": step, "steps": steps, "channels": ratio * step / steps,
                 "params": sum(p.numel() for p in work.parameters())})
    del pruner
    if area is not None:
        area.clear()
    work.eval()
    spec = shrunk_spec(model, work)
    return derive(model, work, "prune", spec=spec, channels=ratio, importance=importance, scope=scope, steps=steps,
                  round_to=round_to, epochs=epochs, excluded=excluded, embeddings=embeddings or None)
