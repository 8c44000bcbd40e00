"""Split, Splits, Task and the checks every data source goes through."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DataError


@dataclass(frozen=True)
class Task:
    """What a data set asks of a model."""

    name: str
    kind: str  # "classification"
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            num_classes=int(d["num_classes"]),
            input_shape=tuple(int(v) for v in d["input_shape"]),
            class_names=tuple(str(v) for v in d.get("class_names", ())),
        )


def tensors(inputs) -> list[torch.Tensor]:
    """The tensors of ``inputs``: a tensor, a tuple of tensors or a dict of tensors."""
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    if isinstance(inputs, (tuple, list)):
        return list(inputs)
    return [inputs]


def n_samples(inputs) -> int:
    """Samples in ``inputs``: the length of the leading axis (shared by every tensor)."""
    ts = tensors(inputs)
    return int(ts[0].shape[0]) if ts else 0


def take(inputs, index):
    """The samples ``index`` (a slice, an index tensor) of ``inputs``, in the same form; a tensor is
    indexed exactly as ``inputs[index]``."""
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(v[index] for v in inputs)
    return inputs[index]


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (float32, N x input_shape) and integer labels ``y`` (int64, N).

    User data read through :func:`slimfuse.data.feed.feed` may hold several inputs: ``x`` is then a
    tuple of tensors (``model(*x)``) or a dict of tensors (``model(**x)``, e.g. ``input_ids`` and
    ``attention_mask``), each with the N samples on its first axis; ``y`` is ``None`` for unlabelled
    inputs.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return n_samples(self.x)

    def subset(self, index) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(take(self.x, index), None if self.y is None else self.y[index])


@dataclass(frozen=True)
class Splits:
    """Train / validation / test splits of one data set, plus its task."""

    train: Split
    val: Split
    test: Split
    task: Task = field(compare=False)

    def __iter__(self):
        return iter((self.train, self.val, self.test))


MIN_CLASS_LIMIT = 1024  # an inferred class count may exceed the sample count up to this many


def validate_arrays(x: np.ndarray, y: np.ndarray, *, where: str, num_classes: int | None = None):
    """Check one (x, y) pair and return it as (float32, int64); raise DataError otherwise."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2:
        raise DataError(f"{where}: X must have shape (samples, features...), got shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{where}: y must be one label per sample, got shape {y.shape}")
    if len(x) == 0:
        raise DataError(f"{where}: no samples")
    if len(x) != len(y):
        raise DataError(f"{where}: X has {len(x)} samples but y has {len(y)}")
    if 0 in x.shape[1:]:
        raise DataError(f"{where}: X has a zero-size feature axis (shape {x.shape})")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{where}: X must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise DataError(f"{where}: X contains {int(bad.sum())} NaN/inf values (first at sample {first[0]})")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(f"{where}: y contains NaN/inf labels")
        if (y != np.round(y)).any():
            raise DataError(f"{where}: labels must be integers, got non-integer values")
    elif y.dtype.kind not in "iub":
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise DataError(f"{where}: labels must be >= 0, found {int(y.min())}")
    if num_classes is not None and (y >= num_classes).any():
        raise DataError(
            f"{where}: label {int(y.max())} is outside the class range 0..{num_classes - 1}"
        )
    if num_classes is None:  # the class count is inferred as max label + 1: it must be plausible
        k = int(y.max()) + 1
        if k > max(len(y), MIN_CLASS_LIMIT):
            raise DataError(
                f"{where}: label {k - 1} implies {k:,} classes for {len(y):,} samples; labels must be "
                f"class indices 0..K-1 (at most max(samples, {MIN_CLASS_LIMIT}) classes)"
            )
    return x, y


def _to_split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))


def split_arrays(
    x: np.ndarray,
    y: np.ndarray,
    task: Task,
    *,
    seed: int = 0,
    val: float = 0.1,
    test: float = 0.2,
) -> Splits:
    """Stratified, seeded train/val/test split; the same seed gives the same split."""
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise DataError(f"val ({val}) and test ({test}) fractions must be in (0, 1) and sum below 1")
    counts = np.bincount(y, minlength=task.num_classes)
    stratify = y if counts[counts > 0].min() >= 3 else None
    idx = np.arange(len(y))
    try:
        from sklearn.model_selection import train_test_split  # imported when a split is made

        rest, te = train_test_split(idx, test_size=test, random_state=seed, stratify=stratify)
        strat_rest = y[rest] if stratify is not None else None
        tr, va = train_test_split(rest, test_size=val / (1 - test), random_state=seed, stratify=strat_rest)
    except ValueError as e:  # too few samples for the requested fractions
        raise DataError(f"cannot split {len(y)} samples into train/val/test: {e}") from None
    shape = (-1, *task.input_shape)
    return Splits(
        train=_to_split(x[tr].reshape(shape), y[tr]),
        val=_to_split(x[va].reshape(shape), y[va]),
        test=_to_split(x[te].reshape(shape), y[te]),
        task=task,
    )
