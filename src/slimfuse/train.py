"""Training and inference: ``fit`` and ``predict``.

``fit`` never mutates its input: it trains a copy and returns it. Techniques
that train (pruning fine-tunes, distillation, QAT, ensemble members) call
``fit`` with hooks instead of writing their own loops:

- ``loss(logits, batch) -> Tensor`` replaces cross-entropy (``batch.index``
  indexes the training split, so cached per-sample targets can be looked up);
- ``after_step(model)`` runs after every optimizer step (pruning masks);
- ``transform(x, generator) -> x`` augments each training batch;
- ``on_epoch_end(model, row)`` runs after every epoch (snapshot ensembles, SWA).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import configs, devices, distributed
from .checkpoint import Checkpoint, Resume, fingerprint, run_key
from .data import Split, Splits, Task
from .data.feed import Batches, describe, feed, infer_task, n_samples, take
from .errors import ConfigError, DataError
from .models.calling import forward
from .models.keras import torch_of
from .models.spec import derive, set_task, task_of


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # the model's inputs: a tensor, a tuple or a dict of tensors (data/feed.py)
    y: torch.Tensor  # labels (None for unlabelled streamed batches under a custom loss)
    index: torch.Tensor  # positions of these samples in the training split (streamed: in this epoch's order)


LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


def cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(logits, batch.y)


def fit(
    model: nn.Module,
    data,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    schedule: str | None = None,
    cycles: int = 1,
    seed: int = 0,
    patience: int | None = None,
    loss: LossFn | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    train: Split | None = None,
    on_epoch_end: Callable[[nn.Module, dict], None] | None = None,
    progress: bool | None = None,
    history: list | None = None,
    checkpoint: str | Path | Resume | None = None,
    parallel: bool | None = None,
    val=None,
    op: str | None = "train",
    device: str | torch.device | None = "cpu",
) -> nn.Module:
    """Train a copy of ``model`` on ``data.train`` (or ``train``) and return it.

    ``optimizer``: ``adam`` or ``sgd`` (with ``momentum``); ``schedule``: ``none`` (or ``None``) or
    ``cosine``; with ``cycles=k`` the cosine restarts k times (warm restarts, one cycle per
    ``epochs / k`` epochs), as snapshot ensembles need. With ``patience``, training stops after that many epochs
    without a better validation accuracy and the best epoch's weights are kept. Deterministic on CPU for a
    given ``seed``. ``history``, if given, receives one dict per epoch. With ``checkpoint``
    (a folder), the state is saved there after every epoch and a rerun with the same
    parameters resumes from it, reaching the same weights as an uninterrupted run; the
    folder is removed when training completes. A :class:`slimfuse.checkpoint.Resume` instead
    of a folder adds values to the checkpoint's key, extra state saved with every epoch (e.g.
    pruning masks) or keeps the finished checkpoint (a stage of a longer job). Tasks other than
    classification (``task.kind``, e.g. ``embedding``) are trained through ``loss`` only: no class-count
    check, no validation accuracy. ``op`` names the
    lineage step recorded on the result (``None``: record nothing, for techniques that
    record their own step). Under ``torchrun --nproc_per_node N`` training is data-parallel
    (DistributedDataParallel; ``batch_size`` is the global batch) with no change to the call;
    ``parallel=False`` trains locally on each rank (ensemble members spread over ranks).

    ``data`` may also be any form :func:`slimfuse.data.feed.feed` reads: a ``DataLoader`` (or any
    re-iterable) of ``(x, y)``, tuple or dict batches (``input_ids``, ``attention_mask``, ``labels``
    ...), a ``Dataset``, arrays ``(X, y)``. Arrays are in memory and trained like Splits (seeded
    shuffles, ``checkpoint``; ``val`` their validation data). Other data is *streamed*: each epoch
    reads the source once, in its own order (a shuffling DataLoader draws from torch's RNG, seeded
    by ``seed``), and the model is called by the convention of :mod:`slimfuse.models.calling`
    (``model(**batch)`` for a dict). Its validation data is ``val`` (any form; none by default, so
    ``patience`` needs it), its task is classification into the model's output classes;
    ``checkpoint`` is refused (resuming needs in-memory data, whose content and order are
    fingerprinted); under torchrun each rank reads its own loader (give it a
    ``DistributedSampler``). A custom ``loss`` may get unlabelled batches (``batch.y`` None).
    ``val`` with Splits replaces ``data.val``.

    ``device``: where training runs (:func:`slimfuse.devices.resolve`: ``auto`` is CUDA when torch sees a
    GPU, each torchrun rank its own, else the CPU; ``cpu``; ``cuda[:N]``). The model and each batch
    move there; hooks get batches on that device (``batch.index`` stays on the CPU). The trained model
    is returned on the CPU, like every verb's result.
    """
    model = torch_of(model)
    if not isinstance(data, Splits):
        batches = feed(data, batch_size=batch_size, labels=True if loss is None else None, where="the training data")
        if batches.split is not None and batches.split.y is not None and train is None:
            data, val = _in_memory(model, batches, val, loss), None  # arrays (X, y): the in-memory path
    if not isinstance(data, Splits):
        return _fit_stream(model, batches, val=val, train=train, epochs=epochs, batch_size=batch_size, lr=lr,
                           optimizer=optimizer, weight_decay=weight_decay, momentum=momentum, schedule=schedule,
                           cycles=cycles, seed=seed, patience=patience, loss=loss, after_step=after_step,
                           transform=transform, on_epoch_end=on_epoch_end, progress=progress, history=history,
                           checkpoint=checkpoint, parallel=parallel, op=op, device=device)
    if val is not None:
        data = Splits(data.train, feed(val, where="val").materialise("validation data"), data.test, data.task)
    return _fit(model, data, None, train=train, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                weight_decay=weight_decay, momentum=momentum, schedule=schedule, cycles=cycles, seed=seed,
                patience=patience, loss=loss, after_step=after_step, transform=transform, on_epoch_end=on_epoch_end,
                progress=progress, history=history, checkpoint=checkpoint, parallel=parallel, op=op, device=device)


def _task_for(model, batches: Batches, loss) -> Task:
    """The data's task, else classification into the model's output classes (``custom`` under a loss hook)."""
    if batches.task is not None:
        return batches.task
    out = probe(model, batches.head(2).x)
    if out.ndim == 2:
        return infer_task(batches, int(out.shape[1]))
    if loss is None:
        raise DataError(f"the model must output (batch, classes) logits, got shape {tuple(out.shape)}")
    task = infer_task(batches, 0)
    return Task(name=task.name, kind="custom", num_classes=0, input_shape=task.input_shape)


def _in_memory(model, batches: Batches, val, loss) -> Splits:
    """In-memory user data (arrays ``(X, y)``, a Split) as Splits: seeded shuffles and checkpoints as for Splits."""
    train = batches.split
    empty = Split(take(train.x, slice(0, 0)), train.y[:0])
    val_split = empty if val is None else feed(val, where="the validation data").materialise("validation data")
    return Splits(train, val_split, empty, _task_for(model, batches, loss))


def _fit_stream(model, data, *, val, train, checkpoint, loss, op, **kw) -> nn.Module:
    """``fit`` on streamed data: the same loop as in memory, batches read from the source each epoch."""
    if checkpoint is not None:
        raise ConfigError(f"{op or 'fit'}: checkpoint= needs in-memory data (slimfuse Splits): a streamed source's "
                          "content and order cannot be fingerprinted for a bit-exact resume")
    if train is not None:
        raise ConfigError("train= replaces the training split of Splits; with streamed data pass the stream as data")
    stream = feed(data, batch_size=kw["batch_size"], labels=True if loss is None else None, where="the training data")
    val_stream = None if val is None else feed(val, batch_size=kw["batch_size"], where="the validation data")
    if kw["patience"] is not None and val_stream is None:
        raise ConfigError("patience= stops on validation accuracy: pass val= (validation data) with streamed data")
    task = _task_for(model, stream, loss)
    return _fit(model, Splits(_EMPTY, _EMPTY, _EMPTY, task), stream, train=None, checkpoint=None, loss=loss, op=op,
                val_stream=val_stream, **kw)


_EMPTY = Split(torch.empty(0, 1), torch.empty(0, dtype=torch.long))


def _fit(model, data, stream: Batches | None, *, train, epochs, batch_size, lr, optimizer, weight_decay, momentum,
         schedule, cycles, seed, patience, loss, after_step, transform, on_epoch_end, progress, history, checkpoint,
         parallel, op, device, val_stream: Batches | None = None) -> nn.Module:
    train = data.train if train is None else train
    dev = devices.resolve(device)
    schedule = None if schedule == "none" else schedule
    _check_fit_args(epochs, batch_size, lr, optimizer, schedule, patience, len(train) if stream is None else 1)
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1 or (epochs and epochs % cycles):
        raise ConfigError(f"cycles must be a positive integer dividing epochs ({epochs}), got {cycles!r}")
    if cycles > 1 and schedule != "cosine":
        raise ConfigError("cycles > 1 needs schedule='cosine' (cosine annealing with warm restarts)")
    model = copy.deepcopy(model)
    run_params = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
                  "weight_decay": weight_decay, "momentum": momentum, "schedule": schedule, "seed": seed,
                  "cycles": cycles, "patience": patience, "n_train": len(train) if stream is None else None, "op": op}
    resume = checkpoint if isinstance(checkpoint, Resume) or checkpoint is None else Resume(checkpoint)
    ckpt = None
    if resume is not None:
        run_params.update(data=fingerprint(train.x, train.y, data.val.x, data.val.y), extra=resume.key)
        ckpt = Checkpoint(resume.folder, run_key(model, run_params))
    loss = loss or cross_entropy
    n = len(train)
    steps_per_epoch = math.ceil(n / batch_size) if stream is None else max(1, len(stream))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched: torch.optim.lr_scheduler.LRScheduler | None = None
        if schedule == "cosine" and cycles > 1:
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=epochs // cycles * steps_per_epoch)
        elif schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
        classify = data.task.kind == "classification"  # other tasks (embeddings) train through a loss hook only
        if stream is not None:
            if classify:
                check_fits(model, stream.head(2), data.task.num_classes)
        elif classify:
            check_fits(model, train, data.task.num_classes)
        else:
            probe(model, train.x)
        if dev != devices.of(model):
            if not devices.movable(model):
                raise ConfigError(f"{op or 'fit'}: this model runs on the CPU only (ONNX Runtime or int8 kernels); "
                                  "train its float source, or pass device='cpu'")
            model.to(dev)
        best: tuple[float, dict | None] = (-1.0, None)
        since_best, first_epoch, rows = 0, 1, []
        resumed = ckpt.load(model=model, opt=opt, sched=sched, gen=gen, extra=resume.state) if ckpt else None
        if resumed:
            first_epoch, best = resumed["epoch"] + 1, resumed["best"]
            since_best, rows = resumed["since_best"], resumed["history"]
            if patience is not None and since_best >= patience:  # it had stopped early
                first_epoch = epochs + 1
        # Under torchrun every rank takes its share of each global batch; DDP averages gradients.
        parallel = distributed.setup() if parallel is None else parallel and distributed.setup()
        rank, ranks = distributed.world() if parallel else (0, 1)
        ids = [dev.index] if parallel and dev.type == "cuda" else None  # each rank's own GPU (NCCL)
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids) if parallel else model
        with _Progress(progress if rank == 0 else False, total=epochs * steps_per_epoch, label=op or "fit") as bar:
            for epoch in range(first_epoch, epochs + 1):
                model.train()
                total, seen = 0.0, 0
                for x, y, idx in _epoch(train, stream, n, batch_size, seed, epoch, parallel, rank, ranks):
                    if transform is not None:
                        x = transform(x, gen)
                    x, y = devices.to(x, dev), devices.to(y, dev)
                    batch = Batch(x, y, idx)
                    if y is None and loss is cross_entropy:
                        raise DataError(f"{op or 'fit'}: a training batch has no labels")
                    value = loss(forward(net, x), batch)
                    if not torch.isfinite(value):
                        raise ConfigError(f"{op or 'fit'}: loss became {value.item()} at epoch {epoch}; "
                                          "lower the learning rate")
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    if after_step is not None:
                        after_step(model)
                    total += value.item() * len(idx)
                    seen += len(idx)
                    bar.advance()
                if not seen:
                    raise DataError(f"{op or 'fit'}: the training data gave no batches in epoch {epoch}")
                row = {"epoch": epoch, "train_loss": distributed.all_reduce_mean(total / seen)}
                if val_stream is not None and classify:
                    row.update(evaluate(model, val_stream))
                elif len(data.val) and classify:
                    row.update(evaluate(model, data.val))
                rows.append(row)
                if on_epoch_end is not None:
                    on_epoch_end(model, row)
                bar.describe(f"{op} epoch {epoch}/{epochs} loss {row['train_loss']:.4f}"
                             + (f" val acc {row['accuracy']:.4f}" if "accuracy" in row else ""))
                if patience is not None and "accuracy" in row:
                    if row["accuracy"] > best[0]:
                        best = (row["accuracy"], copy.deepcopy(model.state_dict()))
                        since_best = 0
                    else:
                        since_best += 1
                if ckpt is not None and rank == 0:
                    ckpt.save(epoch=epoch, model=model, opt=opt, sched=sched, gen=gen, best=best,
                              since_best=since_best, history=rows, extra=resume.state)
                if patience is not None and since_best >= patience:
                    break
        if best[1] is not None:
            model.load_state_dict(best[1])
    if history is not None:
        history.extend(rows)
    if ckpt is not None and distributed.is_main() and not resume.keep:
        ckpt.clear()
    model.to(devices.CPU).eval()
    params_rec = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "seed": seed}
    if stream is not None:  # the source batches itself
        params_rec.update(batch_size=getattr(stream.source, "batch_size", None), data="stream")
    if op:
        derive(model, model, op, **params_rec)
    if task_of(model) is None:
        set_task(model, data.task.to_dict())
    return model


def _epoch(train: Split, stream: Batches | None, n: int, batch_size: int, seed: int, epoch: int, parallel: bool,
           rank: int, ranks: int):
    """``(inputs, labels, index)`` of one epoch: a seeded permutation of the in-memory split, or the stream."""
    if stream is not None:
        start = 0
        for x, y in stream:
            k = n_samples(x)
            yield x, y, torch.arange(start, start + k)
            start += k
        return
    # The order depends on (seed, epoch) only, so every rank agrees on it.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if parallel:
            if len(idx) < ranks:  # too few samples left to give every rank one
                continue
            idx = idx[rank::ranks]
        yield take(train.x, idx), train.y[idx], idx


def _check_fit_args(epochs, batch_size, lr, optimizer, schedule, patience, n_train):
    configs.FineTune.build(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                           schedule=schedule or "none", patience=patience)  # one set of names and bounds
    if n_train == 0:
        raise DataError("the training split is empty")


def probe(model: nn.Module, x, *, who: str = "the model") -> torch.Tensor:
    """Run ``model`` once in eval mode on a few samples (inputs of any form, ``models/calling.py``);
    a shape or calling mismatch becomes a clear DataError."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = forward(model, devices.to(take(x, slice(0, 2)), devices.of(model)))
    except TypeError as e:  # e.g. a forward that takes several inputs, called with one tensor
        what = "one input tensor" if isinstance(x, torch.Tensor) else describe(x)
        raise DataError(f"{who} cannot be called with {what}{inputs_hint(model)}: "
                        f"{str(e).splitlines()[0]}") from None
    except (RuntimeError, IndexError, ValueError) as e:
        what = f"of shape {tuple(x.shape[1:])}" if isinstance(x, torch.Tensor) else describe(x)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{who} cannot take inputs {what}: {msg}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        kind = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list, dict)) else type(out).__name__
        raise DataError(f"{who} returns {kind} outputs; slimfuse needs one tensor of (batch, classes) logits: wrap "
                        "the model in a module that returns the logits alone")
    return out


def inputs_hint(model: nn.Module) -> str:
    """`` (its forward takes 2 inputs: a, b; ...)`` when ``model.forward`` needs more than one input, else ``""``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ""
    required = [p.name for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if len(required) <= 1:
        return ""
    return (f" (its forward takes {len(required)} inputs: {', '.join(required)}; slimfuse feeds every batch as one "
            "tensor: wrap the model in a module that takes one tensor)")


def check_fits(model: nn.Module, split: Split, num_classes: int | None = None) -> None:
    """One forward pass on two samples: a shape or class-count mismatch becomes a clear DataError."""
    out = probe(model, split.x)
    if out.ndim != 2:
        raise DataError(f"the model must output (batch, classes) logits, got shape {tuple(out.shape)}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise DataError(f"the model outputs {out.shape[1]} classes but the task has {num_classes}")
    if len(split) and split.y is not None and len(split.y) and int(split.y.max()) >= out.shape[1]:
        raise DataError(f"the data has label {int(split.y.max())} but the model outputs only {out.shape[1]} classes")


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, Split):
        return x.x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return x


@torch.inference_mode()
def predict(model: nn.Module, x, *, batch_size: int = 1024, output: str = "logits",
            device: str | torch.device | None = None) -> torch.Tensor:
    """Batched inference in eval mode; the result is on the CPU. ``output``: ``logits``, ``proba`` or ``label``.

    ``x``: a tensor, an array, a :class:`Split`, or any data :func:`slimfuse.data.feed.feed` reads (a
    DataLoader of batches, a Dataset, ...; labels are not needed and are ignored), streamed. Batches
    go to the device the model is on; ``device`` (``auto``, ``cpu``, ``cuda[:N]``) runs it there for
    the call and puts it back after (a CPU-only model, ONNX Runtime or int8, stays on the CPU)."""
    model = torch_of(model)
    if output not in ("logits", "proba", "label"):
        raise ConfigError(f"unknown output {output!r}; choose logits, proba or label")
    stream = None
    if isinstance(x, (Split, np.ndarray, torch.Tensor)):
        x = _as_tensor(x)
    else:
        stream = feed(x, batch_size=batch_size, labels=None, where="the data to predict")
    was_training = model.training
    model.eval()
    try:
        with _placed(model, device) as dev:
            if stream is None:
                outs = [forward(model, devices.to(take(x, slice(i, i + batch_size)), dev)).cpu()
                        for i in range(0, n_samples(x), batch_size)]
            else:
                outs = [forward(model, devices.to(inputs, dev)).cpu() for inputs, _ in stream]
    finally:
        model.train(was_training)
    logits = torch.cat(outs).float() if outs else torch.empty(0)
    if output == "proba":
        return logits.softmax(-1)
    if output == "label":
        return logits.argmax(-1)
    return logits


def evaluate(model: nn.Module, split, *, device: str | torch.device | None = None) -> dict[str, float]:
    """Accuracy and mean negative log-likelihood on ``split`` (a :class:`Split`, or labelled data of any
    form :func:`slimfuse.data.feed.feed` reads, streamed); ``device`` as for :func:`predict`."""
    model = torch_of(model)
    if not isinstance(split, Split):
        logits, y = predict_labelled(model, split, device=device)
        return {"accuracy": (logits.argmax(-1) == y).float().mean().item(),
                "nll": F.cross_entropy(logits, y).item()}
    logits = predict(model, split, device=device)
    return {
        "accuracy": (logits.argmax(-1) == split.y).float().mean().item(),
        "nll": F.cross_entropy(logits, split.y).item(),
    }


@torch.inference_mode()
def predict_labelled(model: nn.Module, data, *, batch_size: int = 1024,
                     device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32) and labels of labelled ``data`` of any form, streamed batch by batch, on the CPU;
    ``device`` as for :func:`predict`."""
    if isinstance(data, Split):
        return predict(model, data, batch_size=batch_size, device=device), data.y
    stream = feed(data, batch_size=batch_size, labels=True, where="the evaluation data")
    was_training = model.training
    model.eval()
    outs, ys = [], []
    try:
        with _placed(model, device) as dev:
            for inputs, y in stream:
                outs.append(forward(model, devices.to(inputs, dev)).float().cpu())
                ys.append(y)
    finally:
        model.train(was_training)
    if not outs:
        raise DataError("the evaluation data has no batches")
    return torch.cat(outs), torch.cat(ys)


def _placed(model: nn.Module, device):
    """The model where it is (``device=None``), or on ``device`` for the block (:func:`devices.placed`)."""
    if device is None:
        return contextlib.nullcontext(devices.of(model))
    return devices.placed(model, devices.resolve(device))


class _Progress:
    """A rich progress bar on an interactive terminal; silent under CI or when piped."""

    def __init__(self, enabled: bool | None, total: int, label: str):
        if enabled is None:
            enabled = sys.stderr.isatty() and not os.environ.get("CI")
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self):
        if self.enabled:
            from rich.progress import Progress

            self.progress = Progress(transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total)
        return self

    def advance(self):
        if self.enabled:
            self.progress.advance(self.task)

    def describe(self, text: str):
        if self.enabled:
            self.progress.update(self.task, description=text)

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
        return False
