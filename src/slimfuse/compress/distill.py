"""``slimfuse.distill(teacher, student, data, ...)``: knowledge distillation (Hinton et al. 2015).

The student learns from the teacher's temperature-softened predictions on a fixed *transfer
set*. Per transfer sample ``i`` the loss is

    l_i = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y_i, z_s)

and a batch's loss is the mean of ``l_i``. A sample without a label (``y_i = -1``: user-supplied
unlabeled inputs, mixup blends) has no cross-entropy term, only its ``alpha``-weighted soft term;
so ``alpha = 0`` is plain cross-entropy training and needs labeled transfer data. The ``T^2``
factor keeps the soft term's gradients on the scale of the hard term's as ``T`` changes.

The teacher is any predictor: an ``nn.Module`` (zoo model, quantized model, ensemble, ONNX
Runtime session wrapped as a module) or a callable mapping a float batch to ``(N, classes)``
logits. Its outputs on the transfer set are computed once (batched, eval mode, no grad) and
cached; training looks them up by ``batch.index``. A teacher whose outputs are already
probabilities (non-negative rows summing to 1) is read as such: its log-probabilities are used
as logits, which gives the same softened targets.

Hint distillation (FitNets, Romero et al. 2015): ``hints={"student.path": "teacher.path"}``
adds ``hint_weight * MSE(proj(student feature), teacher feature)`` per pair; ``proj`` is a
learned linear map (a 1x1 convolution for feature maps of equal spatial size), trained jointly
with the student and discarded afterwards. Teacher features are cached like its logits.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import configs, devices, limits
from ..checkpoint import Resume
from ..data import Split, Splits
from ..data.feed import Batches, feed, n_samples, take
from ..errors import ConfigError, DataError
from ..models.calling import call, select, selector
from ..models.keras import torch_of
from ..models.spec import derive, lineage_of, lineage_str, spec_of
from ..train import Batch, fit, probe
from ..validate import check

UNLABELED = -1


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Mean over samples of ``alpha*T^2*KL(p_t^T || p_s^T) + (1-alpha)*CE(y, z_s)``.

    Labels equal to ``-1`` mark unlabeled samples: they contribute no cross-entropy term.
    """
    t = float(temperature)
    return _loss(student_logits, F.log_softmax(teacher_logits.float() / t, -1), y, t, float(alpha))


def _loss(z_s: torch.Tensor, log_p_t: torch.Tensor, y: torch.Tensor, t: float, alpha: float) -> torch.Tensor:
    log_p_s = F.log_softmax(z_s / t, -1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    ce = F.cross_entropy(z_s, y, ignore_index=UNLABELED, reduction="none")
    return (alpha * t * t * kl + (1.0 - alpha) * ce).mean()


# --- transfer sets ------------------------------------------------------------------------------


def transfer_set(
    data: Splits,
    transfer="train",
    *,
    copies: int = 4,
    shift: int = 2,
    noise: float = 0.05,
    mixup: float = 0.0,
    seed: int = 0,
) -> Split:
    """Materialize the fixed transfer set (a ``Split``; label ``-1`` marks unlabeled samples).

    ``transfer``: ``"train"`` (the training split); ``"augment"`` (the training split plus
    ``copies`` augmented copies: for images a random shift of up to ``shift`` pixels per axis and
    Gaussian noise of std ``noise``; for other inputs the noise only; plus ``mixup`` times as many
    unlabeled mixup blends of random training pairs, weight ~ Beta(0.4, 0.4)); a labeled
    ``Split``; an array or tensor of unlabeled inputs (``(N, *input_shape)`` or flat
    ``(N, features)``); or a list/tuple of these, concatenated. Seeded: the same seed gives the
    same set.
    """
    if isinstance(transfer, (list, tuple)):
        if not transfer:
            raise ConfigError("transfer: an empty list of transfer sources")
        parts = [transfer_set(data, t, copies=copies, shift=shift, noise=noise, mixup=mixup, seed=seed + i)
                 for i, t in enumerate(transfer)]
        return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    if isinstance(transfer, Split):
        return Split(_as_inputs(transfer.x, data, "transfer split"), transfer.y.long())
    if isinstance(transfer, (np.ndarray, torch.Tensor)):
        x = _as_inputs(transfer, data, "transfer array")
        return Split(x, torch.full((len(x),), UNLABELED, dtype=torch.long))
    if transfer == "train":
        return data.train
    if transfer == "augment":
        return augment(data.train, copies=copies, shift=shift, noise=noise, mixup=mixup, seed=seed)
    raise ConfigError(
        f"unknown transfer set {transfer!r}; use 'train', 'augment', a labeled Split, an array of "
        "unlabeled inputs, or a list of these"
    )


def augment(split: Split, *, copies: int = 4, shift: int = 2, noise: float = 0.05, mixup: float = 0.0,
            seed: int = 0) -> Split:
    """``split`` plus ``copies`` shifted/noisy copies (labels kept) and unlabeled mixup blends."""
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise ConfigError(f"copies must be a non-negative integer, got {copies!r}")
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ConfigError(f"shift must be a non-negative integer (pixels), got {shift!r}")
    if not (noise >= 0 and math.isfinite(noise)):
        raise ConfigError(f"noise must be a non-negative standard deviation, got {noise!r}")
    if not (mixup >= 0 and math.isfinite(mixup)):
        raise ConfigError(f"mixup must be a non-negative multiple of the training set size, got {mixup!r}")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    xs, ys = [split.x], [split.y]
    for _ in range(copies):
        x = shifted(split.x, shift, gen) if split.x.ndim == 4 else split.x.clone()
        if noise:
            x = x + noise * torch.randn(x.shape, generator=gen)
        xs.append(x)
        ys.append(split.y)
    n_mix = round(mixup * len(split))
    if n_mix:
        a, b = torch.from_numpy(rng.integers(len(split), size=(2, n_mix)))
        lam = torch.from_numpy(rng.beta(0.4, 0.4, n_mix).astype(np.float32)).view(-1, *[1] * (split.x.ndim - 1))
        xs.append(lam * split.x[a] + (1 - lam) * split.x[b])
        ys.append(torch.full((n_mix,), UNLABELED, dtype=torch.long))
    return Split(torch.cat(xs), torch.cat(ys))


def shifted(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image of ``x`` (N, C, H, W) by a random (dy, dx) in [-max_shift, max_shift], zero fill."""
    if max_shift == 0:
        return x.clone()
    s = max_shift
    n, _, h, w = x.shape
    padded = F.pad(x, (s, s, s, s))
    d = torch.randint(-s, s + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for dy, dx in {tuple(v) for v in d.tolist()}:
        rows = ((d[:, 0] == dy) & (d[:, 1] == dx)).nonzero().flatten()
        out[rows] = padded[rows, :, s - dy : s - dy + h, s - dx : s - dx + w]
    return out


def _as_inputs(x, data: Splits, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.number):
            raise DataError(f"{what}: inputs must be numeric, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    x = x.float()
    shape = tuple(data.task.input_shape)
    if x.ndim >= 1 and tuple(x.shape[1:]) != shape:
        if x.ndim == 2 and x.shape[1] == math.prod(shape):
            x = x.reshape(-1, *shape)
        else:
            raise DataError(f"{what}: inputs have shape {tuple(x.shape)}, expected (N, {', '.join(map(str, shape))})")
    if len(x) == 0:
        raise DataError(f"{what}: no samples")
    if not torch.isfinite(x).all():
        raise DataError(f"{what}: inputs contain NaN/inf values")
    return x.contiguous()


# --- the teacher --------------------------------------------------------------------------------


@torch.inference_mode()
def teacher_outputs(teacher, x: torch.Tensor, num_classes: int, *, layers: Sequence[str] = (),
                    batch_size: int = 1024, device: torch.device = devices.CPU
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The teacher's logits on ``x`` (batched, eval mode, no grad, run on ``device``) and its features at
    ``layers``, on the CPU. Features that would not fit the memory budget (:func:`slimfuse.limits.budget`,
    ``SLIMFUSE_MAX_BYTES``) are written to a file-backed array in the temp folder instead (read back a
    batch of rows at a time; the file is gone once the tensors are); a disk without room for them is
    one ``DataError``.

    Probabilities (non-negative rows summing to 1) are turned into log-probabilities. Raises
    ConfigError when ``teacher`` is not a predictor with ``num_classes`` outputs.
    """
    if not callable(teacher):
        raise ConfigError(f"the teacher must be a predictor (an nn.Module or callable), got {type(teacher).__name__}")
    taps = _Taps(teacher, layers, "teacher") if layers else None
    was_training = getattr(teacher, "training", None)
    if isinstance(teacher, nn.Module):
        teacher.eval()
    n = n_samples(x)
    logits, feats = [], [_Rows(n, f"the teacher's {p} features") for p in layers]
    try:
        with devices.placed(teacher, device):
            for start in range(0, n, batch_size):
                out = _check_output(_call(teacher, take(x, slice(start, start + batch_size))), num_classes)
                logits.append(out)
                if taps is not None:
                    for acc, f in zip(feats, taps.take()):
                        acc.add(f.float().cpu())
    finally:
        if taps is not None:
            taps.remove()
        if isinstance(teacher, nn.Module):
            teacher.train(was_training)
    return _as_logits(torch.cat(logits)), [f.tensor() for f in feats]


class _Rows:
    """Per-sample outputs gathered batch by batch: in memory, or, when all ``n`` rows would not fit the
    memory budget, in an unlinked temporary file mapped as an array (space reserved up front)."""

    def __init__(self, n: int, what: str):
        self.n, self.what, self.parts, self.array, self.filled = n, what, [], None, 0

    def add(self, t: torch.Tensor) -> None:
        if self.array is None and not self.parts:
            need = self.n * t[0].numel() * t.element_size()
            if need > limits.budget():
                self.array = _file_backed((self.n, *t.shape[1:]), need, self.what)
        if self.array is None:
            self.parts.append(t)
        else:
            self.array[self.filled : self.filled + len(t)] = t.numpy()
            self.filled += len(t)

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.array) if self.array is not None else torch.cat(self.parts)


def _file_backed(shape: tuple, nbytes: int, what: str) -> np.ndarray:
    """A float32 array of ``shape`` in a temporary file (unlinked at once: it lives as long as the array)."""
    import errno
    import tempfile

    try:
        with tempfile.TemporaryFile(prefix="slimfuse-teacher-") as f:  # the mapping keeps the file once closed
            os.posix_fallocate(f.fileno(), 0, max(nbytes, 1))  # no room: an error now, not a SIGBUS later
            return np.memmap(f, dtype=np.float32, mode="r+", shape=shape)
    except OSError as e:
        room = "no room for" if e.errno == errno.ENOSPC else f"cannot write ({e.strerror})"
        raise DataError(f"{what} ({limits.gib(nbytes)}) exceed the memory budget and the temp folder "
                        f"({tempfile.gettempdir()}) has {room} them; free disk space, set TMPDIR, or raise "
                        f"{limits.ENV}") from None


def _as_logits(z: torch.Tensor) -> torch.Tensor:
    if (z >= 0).all() and (z <= 1).all() and torch.allclose(z.sum(-1), torch.ones(len(z), device=z.device), atol=1e-4):
        # probabilities -> log-probabilities (same softened targets)
        z = z.clamp_min(torch.finfo(torch.float32).tiny).log()
    return z


def _call(teacher, x):
    """The teacher's output on inputs of any form (``models/calling.py``), run where the teacher is and
    returned on the inputs' device."""
    home = devices.where(x)
    try:
        out = select(call(teacher, devices.to(x, devices.of(teacher))), selector(teacher))
        return out.to(home) if isinstance(out, torch.Tensor) else out  # anything else: refused by the caller
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        what = f"of shape {tuple(x.shape[1:])}" if isinstance(x, torch.Tensor) else "of this form"
        raise ConfigError(
            f"the teacher cannot predict inputs {what}: "
            f"{str(e).splitlines()[0] if str(e) else e!r}"
        ) from None


def _check_output(out, num_classes: int) -> torch.Tensor:
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the teacher is not a predictor: it returned {type(out).__name__}, not a tensor of logits")
    if out.ndim != 2 or not out.is_floating_point():
        raise ConfigError(f"the teacher is not a predictor: it returned a {out.dtype} tensor of shape "
                          f"{tuple(out.shape)}, not (batch, classes) logits")
    if out.shape[1] != num_classes:
        raise ConfigError(f"the teacher predicts {out.shape[1]} classes but the student and data have {num_classes}")
    if not torch.isfinite(out).all():
        raise ConfigError("the teacher returned NaN/inf logits")
    return out.float()


def describe(model) -> str:
    """A short name for a predictor in lineage: its architecture and lineage, or its class."""
    spec = spec_of(model) if isinstance(model, nn.Module) else None
    name = (spec.get("arch") or spec.get("factory")) if spec else type(model).__name__
    steps = lineage_of(model) if isinstance(model, nn.Module) else []
    return f"{name}[{lineage_str(steps)}]" if steps else str(name)


# --- hints (FitNets) ----------------------------------------------------------------------------


class _Taps:
    """Forward hooks that keep the outputs of named submodules of ``model``."""

    def __init__(self, model, paths: Sequence[str], who: str):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"hint distillation needs the {who} to be an nn.Module, got {type(model).__name__}")
        names = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.paths = list(paths)
        self.handles = []
        for p in self.paths:
            if p not in names or p == "":
                known = ", ".join(n for n in names if n)[:300]
                raise ConfigError(f"hints: the {who} has no module {p!r} (modules: {known})")
            self.handles.append(names[p].register_forward_hook(self._keep(p)))

    def _keep(self, path):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise ConfigError(f"hints: module {path!r} outputs {type(output).__name__}, not a tensor")
            self.out[path] = output

        return hook

    def take(self) -> list[torch.Tensor]:
        return [self.out.pop(p) for p in self.paths]

    def remove(self):
        for h in self.handles:
            h.remove()


class _Shared:
    """A holder that ``copy.deepcopy`` shares instead of copying (``fit`` trains a deep copy)."""

    def __init__(self):
        self.features: list[torch.Tensor] = []

    def __deepcopy__(self, memo):
        return self


class _HintStudent(nn.Module):
    """The student plus one projection per hint; in training mode it records the projected features."""

    def __init__(self, student: nn.Module, paths: Sequence[str], projections: Sequence[nn.Module]):
        super().__init__()
        self.student = student
        self.projections = nn.ModuleList(projections)
        self.paths = list(paths)
        self.shared = _Shared()

    def forward(self, x):
        if not self.training:
            return self.student(x)
        taps = _Taps(self.student, self.paths, "student")
        try:
            z = self.student(x)
            feats = taps.take()
        finally:
            taps.remove()
        self.shared.features = [proj(_match(f, proj)) for f, proj in zip(feats, self.projections)]
        return z


def _projection(s: torch.Tensor, t: torch.Tensor) -> nn.Module:
    """A 1x1 conv for feature maps of equal spatial size, else a linear map of the flattened features."""
    if s.ndim == 4 and t.ndim == 4 and s.shape[2:] == t.shape[2:]:
        return nn.Conv2d(s.shape[1], t.shape[1], 1)
    return nn.Linear(math.prod(s.shape[1:]), math.prod(t.shape[1:]))


def _match(f: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    return f if isinstance(proj, nn.Conv2d) else f.flatten(1)


# --- distill ------------------------------------------------------------------------------------


def distill(
    teacher,
    student: nn.Module,
    data: Splits,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    epochs: int = 20,
    transfer="augment",
    copies: int = 4,
    shift: int = 2,
    noise: float = 0.05,
    mixup: float = 0.0,
    hints: Mapping[str, str] | None = None,
    hint_weight: float = 1.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool | None = None,
    history: list | None = None,
    checkpoint: str | Path | None = None,
    config: configs.Distill | None = None,
    validate: bool = True,
    device: str | torch.device | None = "cpu",
    **fit_options,
) -> nn.Module:
    """Train a copy of ``student`` to imitate ``teacher`` on a fixed transfer set; return it.

    ``transfer``, ``copies``, ``shift``, ``noise``, ``mixup``: the transfer set (see
    :func:`transfer_set`). The default, ``"augment"`` with 4 copies, is the training split plus
    4 copies shifted by up to ``shift`` pixels with Gaussian noise: on the training split alone
    a teacher that fits it returns near-one-hot targets that carry little beyond the labels, and
    distilling there lost to the student trained alone with unregularized teachers (mnist5k
    784-64-10, 3 seeds: 0.910 vs 0.919; digits 0.841 vs 0.889); on the augmented set the teacher
    labels inputs it has not memorized and the student closes most of the gap (mnist5k: 0.941
    from a 0.946 teacher, 0.953 from a regularized 0.956 one; ``benchmarks/distill.py``). ``transfer="train"``
    is the old behaviour (5x fewer steps per epoch). ``hints``: ``{"student.module.path": "teacher.module.path"}`` adds
    FitNets hint terms weighted by ``hint_weight``. Other options (``optimizer``, ``schedule``,
    ``weight_decay``, ``patience`` ...) go to :func:`slimfuse.fit`. Neither input is mutated; the
    result records the lineage step ``distill``.

    ``checkpoint`` (a folder): the training state is saved there after every epoch and a rerun
    with the same arguments (same teacher outputs, transfer set, temperature, alpha, hints)
    resumes from it to the same weights as an uninterrupted run; a checkpoint of other arguments
    is replaced with a warning. The folder is removed when distillation completes.

    ``config``: a :class:`slimfuse.configs.Distill` instead of the keywords (they are its shorthand).
    ``validate``: check the trained student against the teacher before returning it (crash, NaN,
    collapse, bit-exact reload; :mod:`slimfuse.validate`); ``False`` skips it (recorded).
    ``device``: where the teacher runs and the student trains (:func:`slimfuse.devices.resolve`); the
    student comes back on the CPU.
    """
    teacher, student = torch_of(teacher), torch_of(student)
    if config is not None:  # the config; the keywords are its shorthand
        return distill(teacher, student, data, seed=seed, progress=progress, history=history, checkpoint=checkpoint,
                       **{**config.model_dump(), **fit_options})
    dev = devices.resolve(device)
    if not isinstance(student, nn.Module):
        raise ConfigError(f"the student must be an nn.Module, got {type(student).__name__}")
    configs.Distill.build(  # one set of names and bounds
        temperature=temperature, alpha=alpha, epochs=epochs, copies=copies, shift=shift, noise=noise, mixup=mixup,
        hints=dict(hints or {}), hint_weight=hint_weight, batch_size=batch_size, lr=lr,
        **({"transfer": transfer} if isinstance(transfer, str) else {}),
        **{k: fit_options[k] for k in ("optimizer", "schedule") if fit_options.get(k) is not None})
    if not isinstance(data, Splits):
        return _distill_stream(teacher, student, data, temperature=temperature, alpha=alpha, epochs=epochs,
                               transfer=transfer, hints=hints, batch_size=batch_size, lr=lr, seed=seed,
                               progress=progress, history=history, checkpoint=checkpoint, validate=validate,
                               device=dev, **fit_options)
    if "transform" in fit_options:
        raise ConfigError("distill caches the teacher's outputs on a fixed transfer set, so on-the-fly transforms "
                          "cannot be used; use transfer='augment' (fixed augmented copies) instead")
    hints = dict(hints or {})
    num_classes = data.task.num_classes
    transfer_split = transfer_set(data, transfer, copies=copies, shift=shift, noise=noise, mixup=mixup, seed=seed)
    labeled = transfer_split.y != UNLABELED
    if alpha == 0 and not labeled.any():
        raise ConfigError("alpha=0 trains on labels only, but the transfer set has no labeled samples")
    if labeled.any() and int(transfer_split.y[labeled].max()) >= num_classes:
        raise DataError(f"transfer labels go up to {int(transfer_split.y.max())} "
                        f"but the task has {num_classes} classes")
    _check_student(student, transfer_split.x[:2], num_classes)
    teacher_logits, teacher_feats = teacher_outputs(teacher, transfer_split.x, num_classes, layers=list(hints.values()),
                                                    device=dev)
    t = float(temperature)
    log_p_t = F.log_softmax(teacher_logits / t, -1).to(dev)  # the loss reads rows by batch.index (on the CPU)

    model: nn.Module = student
    if hints:
        with torch.random.fork_rng(devices=[]):  # the projections' init follows ``seed`` (resumable)
            torch.manual_seed(seed)
            model = _hint_student(student, list(hints), teacher_feats, transfer_split.x[:2])
        shared = model.shared

        def loss(z, batch: Batch):
            hint = sum(F.mse_loss(f, tf[batch.index].to(f.device).flatten(1).view_as(f))
                       for f, tf in zip(shared.features, teacher_feats))
            return _loss(z, log_p_t[batch.index], batch.y, t, alpha) + hint_weight * hint
    else:
        def loss(z, batch: Batch):
            return _loss(z, log_p_t[batch.index], batch.y, t, alpha)

    if checkpoint is not None:  # the teacher's cached outputs stand for the teacher in the key
        checkpoint = Resume(checkpoint, key={"op": "distill", "temperature": t, "alpha": float(alpha),
                                             "hints": hints, "hint_weight": hint_weight,
                                             "teacher": [teacher_logits, *teacher_feats]})
    trained = fit(model, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, loss=loss,
                  train=transfer_split, progress=progress, history=history, op=None, checkpoint=checkpoint,
                  device=dev, **fit_options)
    if hints:
        trained = trained.student  # the projections are discarded
        trained.eval()
    result = derive(
        student, trained, "distill", teacher=describe(teacher), temperature=t, alpha=float(alpha),
        transfer=_describe_transfer(transfer), transfer_size=len(transfer_split), epochs=epochs,
        batch_size=batch_size, lr=lr, seed=seed, hints=hints or None,
        hint_weight=hint_weight if hints else None,
    )
    return check(result, "distill", reference=teacher if isinstance(teacher, nn.Module) else None, data=data,
                 validate=validate, fix="more epochs=, a wider student, or a lower temperature=",
                 floor=0.0)  # a student trained from scratch may still be poor: only a collapse is an error


def _distill_stream(teacher, student, data, *, temperature, alpha, epochs, transfer, hints, batch_size, lr, seed,
                    progress, history, checkpoint, validate, device, **fit_options) -> nn.Module:
    """``distill`` on streamed data (a DataLoader, ...): the stream is the transfer set and the teacher's
    outputs are computed batch by batch as training reads it (eval mode, no grad), nothing cached."""
    if transfer not in ("augment", "train"):
        raise ConfigError("with streamed data the stream itself is the transfer set; transfer= applies to Splits")
    if hints:
        raise ConfigError("hints= cache the teacher's features on a fixed transfer set: pass slimfuse Splits")
    if checkpoint is not None:
        raise ConfigError("checkpoint= needs in-memory data (slimfuse Splits) to resume bit-exactly")
    if "transform" in fit_options:
        raise ConfigError("distill: transform= applies to in-memory Splits")
    stream = data if isinstance(data, Batches) else feed(data, batch_size=batch_size, labels=None,
                                                         where="the transfer data")
    first = stream.head(2)
    if not callable(teacher):
        raise ConfigError(f"the teacher must be a predictor (an nn.Module or callable), got {type(teacher).__name__}")
    was_training = getattr(teacher, "training", None)
    if isinstance(teacher, nn.Module):
        teacher.eval()
    try:
        with torch.inference_mode():
            probe_out = _call(teacher, first.x)
        if not isinstance(probe_out, torch.Tensor) or probe_out.ndim != 2:
            _check_output(probe_out, -1)
        num_classes = int(probe_out.shape[1])
        _check_student(student, first.x, num_classes)
        t = float(temperature)

        def loss(z, batch: Batch):
            with torch.no_grad():
                zt = _as_logits(_check_output(_call(teacher, batch.x), num_classes))
            y = batch.y if batch.y is not None else torch.full((len(z),), UNLABELED, dtype=torch.long, device=z.device)
            if alpha == 0 and not (y != UNLABELED).any():
                raise ConfigError("alpha=0 trains on labels only, but a transfer batch has no labels")
            if (y != UNLABELED).any() and int(y.max()) >= num_classes:
                raise DataError(f"transfer labels go up to {int(y.max())} but the teacher predicts {num_classes} "
                                "classes")
            return _loss(z, F.log_softmax(zt / t, -1), y, t, float(alpha))

        with devices.placed(teacher, device):
            trained = fit(student, stream, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, loss=loss,
                          progress=progress, history=history, op=None, device=device, **fit_options)
    finally:
        if isinstance(teacher, nn.Module):
            teacher.train(was_training)
    result = derive(student, trained, "distill", teacher=describe(teacher), temperature=t, alpha=float(alpha),
                    transfer="stream", epochs=epochs, lr=lr, seed=seed)
    return check(result, "distill", reference=teacher if isinstance(teacher, nn.Module) else None, data=stream,
                 validate=validate, fix="more epochs=, a wider student, or a lower temperature=", floor=0.0)


def _check_student(student: nn.Module, x, num_classes: int) -> None:
    out = probe(student, x, who="the student")
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise ConfigError(f"the student outputs shape {tuple(out.shape[1:])} but the data has {num_classes} classes; "
                          "teacher and student must predict the same classes")


def _hint_student(student: nn.Module, paths: list[str], teacher_feats, x: torch.Tensor) -> _HintStudent:
    student = copy.deepcopy(student)
    taps = _Taps(student, paths, "student")
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            student(x)
        feats = taps.take()
    finally:
        taps.remove()
        student.train(was_training)
    return _HintStudent(student, paths, [_projection(s, t[:2]) for s, t in zip(feats, teacher_feats)])


def _describe_transfer(transfer) -> str:
    if isinstance(transfer, (list, tuple)):
        return "+".join(_describe_transfer(t) for t in transfer)
    if isinstance(transfer, str):
        return transfer
    if isinstance(transfer, Split):
        return f"split[{len(transfer)}]"
    return f"unlabeled[{len(transfer)}]"


# --- students and teachers for the CLI -----------------------------------------------------------
