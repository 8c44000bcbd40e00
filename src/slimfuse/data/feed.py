"""Data in the forms users have, normalised in one place: :func:`feed` -> :class:`Batches`.

Every verb reads its data through :func:`feed`, which accepts

- slimfuse :class:`Splits` (its ``train`` split, or the one named by ``split=``) or a :class:`Split`;
- a ``torch.utils.data.Dataset`` (map-style or iterable), batched by a ``DataLoader`` with the default
  collate function (no shuffling);
- a ``DataLoader`` or any re-iterable of batches (a list of batches, a generator for one pass), where a
  batch is ``(x, y)``, a tuple of tensors ``(x1, ..., xk, y)`` (the last one is the label), or a dict of
  tensors as Hugging Face collators produce (``input_ids``, ``attention_mask``, ``labels``, ...: the
  label is the first of :data:`LABEL_KEYS` present, the other keys are the model's keyword inputs);
- NumPy arrays or tensors ``(X, y)``, or a dict of arrays with a label key (tokenizer output plus labels);
- an array or tensor of inputs alone (no labels: prediction, calibration).

What comes out is a :class:`Batches` source yielding ``(inputs, labels)``: ``inputs`` is a tensor, a
tuple of tensors (the model is called ``model(*inputs)``) or a dict of tensors (``model(**inputs)``),
``labels`` an int64 vector or ``None``. Every batch is checked as it is read: one leading sample axis
shared by every tensor, finite floating inputs, labels one integer >= 0 per sample; a bad batch is one
:class:`DataError` naming the batch and the key. Float64 inputs become float32 (models are float32);
integer inputs (token ids) keep their dtype.

Nothing is read before it is needed: training streams over the source once per epoch, evaluation
once, and :meth:`Batches.head` reads only the first ``n`` samples (calibration, the validation gate's
sample, example inputs for tracing). :meth:`Batches.materialise` reads everything into one
:class:`Split` under the memory budget (``slimfuse.limits``), for the few uses that cannot stream.

The same helpers work on a materialised :class:`Split` whose ``x`` is a tuple or dict of tensors:
:func:`n_samples`, :func:`take`, :func:`cat`, :func:`describe`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch

from ..errors import DataError
from ..limits import check_bytes
from .core import Split, Splits, Task, n_samples, take, tensors

LABEL_KEYS = ("labels", "label", "y")  # dict batches: the first key present holds the labels

Inputs = torch.Tensor | tuple | dict  # a tensor, a tuple of tensors or a dict of tensors


# --------------------------------------------------------------------------- inputs of any form


def cat(parts: list):
    """Concatenate inputs of one form along the sample axis."""
    first = parts[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))
    return torch.cat(parts)


def nbytes(inputs) -> int:
    return sum(t.element_size() * t.numel() for t in tensors(inputs))


def describe(inputs) -> str:
    """Shapes for messages: ``(1, 28, 28)``, ``{input_ids: (16,) int64, ...}`` (per sample)."""
    def one(t):
        return f"{tuple(t.shape[1:])}" + ("" if t.is_floating_point() else f" {str(t.dtype).replace('torch.', '')}")

    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {one(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(one(v) for v in inputs) + ")"
    return f"{tuple(inputs.shape[1:])}"


def is_tensor_input(inputs) -> bool:
    return isinstance(inputs, torch.Tensor)


# --------------------------------------------------------------------------- one batch


def _tensor(v, where: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        t = v
    elif isinstance(v, np.ndarray):
        if not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_) or np.issubdtype(v.dtype, np.complexfloating):
            raise DataError(f"{where}: must be numeric, got dtype {v.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(v))
    else:
        raise DataError(f"{where}: holds {type(v).__name__}, not a tensor or array")
    return t.float() if t.dtype == torch.float64 else t


def _labels(v, n: int, where: str) -> torch.Tensor:
    y = _tensor(v, f"{where}: the labels")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be one integer per sample, got shape {tuple(y.shape)}")
    if len(y) != n:
        raise DataError(f"{where}: {n} inputs but {len(y)} labels")
    if y.is_floating_point():
        if not torch.isfinite(y).all():
            raise DataError(f"{where}: the labels contain NaN/inf")
        if (y != y.round()).any():
            raise DataError(f"{where}: labels must be class indices (integers), got non-integer values")
    elif y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    y = y.long()
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(y.min())}")
    return y


def _check_inputs(inputs, where: str):
    """Checked inputs (same form) and their sample count."""
    if isinstance(inputs, Mapping):
        named = [(repr(k), v) for k, v in inputs.items()]
    elif isinstance(inputs, (tuple, list)):
        named = [(f"input {i}", v) for i, v in enumerate(inputs)]
    else:
        named = [("the input tensor", inputs)]
    if not named:
        raise DataError(f"{where}: the batch has no inputs")
    checked, n = [], None
    for label, v in named:
        t = _tensor(v, f"{where}: {label}")
        if t.ndim == 0:
            raise DataError(f"{where}: {label} is a scalar; inputs need a leading sample axis")
        if n is None:
            n = int(t.shape[0])
        elif int(t.shape[0]) != n:
            raise DataError(f"{where}: {label} has {int(t.shape[0])} samples but the batch's first input has {n}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).reshape(len(t), -1).any(1).nonzero()
            raise DataError(f"{where}: {label} contains NaN/inf values (first at sample {int(bad[0])})")
        checked.append(t)
    if n == 0:
        raise DataError(f"{where}: an empty batch (no samples)")
    if isinstance(inputs, Mapping):
        return dict(zip(inputs, checked)), n
    if isinstance(inputs, (tuple, list)):
        return tuple(checked), n
    return checked[0], n


def split_batch(batch, *, where: str = "batch", labels: bool | None = True):
    """``(inputs, y)`` from one batch of any supported form, checked (see the module docstring).

    ``labels``: ``True`` the batch must carry labels; ``None`` labels are optional (``y`` may be
    ``None``); ``False`` the whole batch is inputs (nothing is taken as a label).
    """
    y = None
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        key = next((k for k in LABEL_KEYS if k in inputs), None) if labels is not False else None
        if key is not None:
            y = inputs.pop(key)
        elif labels:
            keys = ", ".join(map(repr, LABEL_KEYS))
            raise DataError(f"{where}: no labels: a dict batch needs one of the keys {keys} "
                            f"(it has {', '.join(map(repr, batch)) or 'none'})")
    elif isinstance(batch, (tuple, list)):
        items = list(batch)
        if labels is False or len(items) < 2:
            if labels and len(items) < 2:
                raise DataError(f"{where}: no labels: a tuple batch is (inputs..., labels), got {len(items)} item(s)")
            inputs = items[0] if len(items) == 1 else tuple(items)
        else:
            y = items[-1]
            inputs = items[0] if len(items) == 2 else tuple(items[:-1])
    elif isinstance(batch, (torch.Tensor, np.ndarray)):
        if labels:
            raise DataError(f"{where}: no labels: the batch is a bare {type(batch).__name__} of inputs; "
                            "give (inputs, labels) batches or a dict with a 'labels' key")
        inputs = batch
    else:
        raise DataError(f"{where}: a batch must be (x, y), a tuple of tensors or a dict of tensors, "
                        f"got {type(batch).__name__}")
    if isinstance(inputs, (tuple, list)) and len(inputs) == 1:
        inputs = inputs[0]
    inputs, n = _check_inputs(inputs, where)
    return inputs, (None if y is None else _labels(y, n, where))


# --------------------------------------------------------------------------- sources


class Batches:
    """A source of checked ``(inputs, labels)`` batches: what every verb reads (see :func:`feed`).

    Iterating it reads the underlying source once (a DataLoader: one epoch). ``task``: the data
    set's :class:`Task` where known (slimfuse Splits), else ``None``. ``split``: the in-memory
    :class:`Split` behind it, if any (verbs keep their exact in-memory paths for those).
    """

    def __init__(self, source, *, where: str = "data", labels: bool | None = True, task: Task | None = None,
                 batch_size: int = 256):
        self.where, self.labels, self.task, self.batch_size = where, labels, task, batch_size
        self.split: Split | None = source if isinstance(source, Split) else None
        self.source = source
        self._once = self.split is None and isinstance(source, Iterator)  # a generator: one pass only
        self._used = False

    def __iter__(self) -> Iterator[tuple]:
        if self.split is not None:
            s = self.split
            n = len(s)
            for start in range(0, n, self.batch_size):
                sl = slice(start, start + self.batch_size)
                yield take(s.x, sl), (None if s.y is None else s.y[sl])
            return
        if self._once and self._used:
            raise DataError(f"{self.where}: a generator can be read only once; pass a DataLoader, a Dataset "
                            "or a list of batches to read it again (training reads it once per epoch)")
        self._used = True
        for i, batch in enumerate(self.source):
            yield split_batch(batch, where=f"{self.where}: batch {i}", labels=self.labels)

    def __len__(self) -> int:
        """Batches per pass (a source without a length is counted by reading it once)."""
        if self.split is not None:
            return -(-len(self.split) // self.batch_size)
        try:
            return len(self.source)
        except TypeError:
            if self._once:
                raise DataError(f"{self.where}: a generator has no length and can be read only once; "
                                "pass a DataLoader or a list of batches") from None
            return sum(1 for _ in self.source)

    def head(self, n: int) -> Split:
        """The first ``n`` samples (fewer if the source has fewer) as one :class:`Split`; reads no further.

        ``y`` is ``None`` when the batches carry no labels."""
        if self.split is not None:
            s = self.split
            return Split(take(s.x, slice(0, n)), None if s.y is None else s.y[:n])
        xs, ys, have = [], [], 0
        for inputs, y in self:
            xs.append(inputs)
            ys.append(y)
            have += n_samples(inputs)
            if have >= n:
                break
        if not xs:
            raise DataError(f"{self.where}: no batches")
        return _joined(xs, ys, self.where, limit=n)

    def materialise(self, what: str) -> Split:
        """Every sample as one :class:`Split`, within the memory budget (``DataError`` beyond it)."""
        if self.split is not None:
            return self.split
        xs, ys, total = [], [], 0
        for inputs, y in self:
            total += nbytes(inputs) + (0 if y is None else y.numel() * 8)
            check_bytes(2 * total, f"{what} (read into memory from {self.where})", DataError)  # the parts + the join
            xs.append(inputs)
            ys.append(y)
        if not xs:
            raise DataError(f"{self.where}: no batches")
        return _joined(xs, ys, self.where)


def _joined(xs: list, ys: list, where: str, limit: int | None = None) -> Split:
    forms = {_form(x) for x in xs}
    if len(forms) > 1:
        raise DataError(f"{where}: batches of different forms ({', '.join(sorted(forms))}); every batch must have "
                        "the same inputs")
    try:
        x = cat(xs)
    except RuntimeError as e:
        raise DataError(f"{where}: batches disagree in their per-sample shapes ({str(e).splitlines()[0]}); "
                        "pad every batch to one length to read them together") from None
    labelled = [y is not None for y in ys]
    if any(labelled) and not all(labelled):
        raise DataError(f"{where}: some batches have labels and some do not")
    y = torch.cat(ys) if all(labelled) else None
    if limit is not None:
        x, y = take(x, slice(0, limit)), (None if y is None else y[:limit])
    return Split(x, y)


def _form(x) -> str:
    if isinstance(x, Mapping):
        return "dict[" + ",".join(sorted(x)) + "]"
    if isinstance(x, (tuple, list)):
        return f"tuple[{len(x)}]"
    return "tensor"


def _is_arrays(data) -> bool:
    """``(X, y)``: two array-likes (X may be a dict of arrays) with one length."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    x, y = data
    arrays = (np.ndarray, torch.Tensor)
    if not isinstance(y, arrays) or getattr(y, "ndim", 0) < 1:
        return False
    if isinstance(x, Mapping):
        return all(isinstance(v, arrays) for v in x.values())
    return isinstance(x, arrays) and x.ndim >= 1 and len(x) == len(y)


def feed(data, *, batch_size: int = 256, labels: bool | None = True, split: str = "train",
         where: str | None = None) -> Batches:
    """Normalise ``data`` of any supported form (module docstring) into :class:`Batches`.

    ``batch_size`` batches in-memory data and Datasets (a DataLoader keeps its own). ``labels``:
    ``True`` every batch must carry labels, ``None`` optional, ``False`` none (all inputs).
    ``split``: which split of :class:`Splits` (``train``, ``val``, ``test``). ``where`` names the
    data in errors.
    """
    where = where or "data"
    if isinstance(data, Batches):
        return data
    if isinstance(data, Splits):
        return Batches(_in_memory(getattr(data, split), labels, f"{where} ({split} split)"),
                       where=f"{where} ({split} split)", labels=labels, task=data.task, batch_size=batch_size)
    if isinstance(data, Split):
        return Batches(_in_memory(data, labels, where), where=where, labels=labels, batch_size=batch_size)
    if _is_arrays(data):
        x, y = split_batch(tuple(data), where=where, labels=True)
        return Batches(Split(x, y), where=where, labels=labels, batch_size=batch_size)
    if isinstance(data, (np.ndarray, torch.Tensor, Mapping)):
        x, y = split_batch(data, where=where, labels=False if not isinstance(data, Mapping) else None)
        if labels and y is None:
            raise DataError(f"{where}: no labels: pass (X, y) or a dict with a 'labels' key")
        return Batches(Split(x, y), where=where, labels=labels, batch_size=batch_size)
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, (Dataset, IterableDataset)) and not isinstance(data, DataLoader):
        if not isinstance(data, IterableDataset) and not hasattr(data, "__len__"):
            raise DataError(f"{where}: a map-style Dataset needs __len__")
        return Batches(DataLoader(data, batch_size=batch_size, shuffle=False), where=where, labels=labels)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DataError(f"{where}: cannot read data of type {type(data).__name__}; pass slimfuse Splits, a Dataset, "
                        "a DataLoader or iterable of batches, or arrays (X, y)")
    return Batches(data, where=where, labels=labels)


def _in_memory(s: Split, labels, where: str) -> Split:
    if labels and s.y is None:
        raise DataError(f"{where}: no labels")
    return s


SPLIT_NAMES = ("train", "val", "test")


def splits_of(data, *, needs: tuple[str, ...], classes, where: str) -> Splits:
    """``data`` as :class:`Splits`, for the verbs that choose on one split and verify on another.

    Splits come back as they are. A dict of split names (``"train"``, ``"val"``, ``"test"``) to data of
    any form :func:`feed` reads (DataLoaders, Datasets, arrays ``(X, y)`` ...) is read into memory,
    each split under the memory budget; ``needs`` are the names that must be there, ``"val"`` always
    (an absent ``train`` or ``test`` is an empty split). ``classes(inputs) -> int``: the class count, asked once, on the
    validation inputs (the model's output width); every split's labels must lie below it. The task
    is classification (:func:`infer_task`)."""
    if isinstance(data, Splits):
        return data
    needs = ("val", *(k for k in needs if k != "val"))
    names = ", ".join(f"'{k}'" for k in needs)
    if not is_split_dict(data):
        raise DataError(f"{where}: pass slimfuse Splits or a dict of {names} data (each a DataLoader, a Dataset or "
                        f"arrays (X, y)), got {describe_data(data)}")
    if missing := [k for k in needs if k not in data]:
        raise DataError(f"{where}: no {' or '.join(repr(k) for k in missing)} data in the dict (it needs {names})")
    parts = {k: feed(v, where=f"{where} ({k!r})").materialise(f"{where} ({k!r} data)") for k, v in data.items()}
    ref = parts["val"]
    count = int(classes(ref.x))
    for k, part in parts.items():
        if len(part.y) and int(part.y.max()) >= count:
            raise DataError(f"{where} ({k!r}): labels go up to {int(part.y.max())} but the model predicts "
                            f"{count} classes")
        if _form(part.x) != _form(ref.x):
            raise DataError(f"{where}: the {k!r} inputs ({_form(part.x)}) differ in form from the others "
                            f"({_form(ref.x)})")
    empty = Split(take(ref.x, slice(0, 0)), ref.y[:0])
    return Splits(**{k: parts.get(k, empty) for k in SPLIT_NAMES}, task=infer_task(feed(ref), count))


def is_split_dict(data) -> bool:
    """A non-empty dict whose keys are split names (not a dict batch of model inputs and labels)."""
    return isinstance(data, Mapping) and bool(data) and set(data) <= set(SPLIT_NAMES)


def describe_data(data) -> str:
    """What ``data`` is, for an error message: its type, and its keys for a dict."""
    if isinstance(data, Mapping):
        return "a dict with keys " + ", ".join(repr(k) for k in list(data)[:8])
    return type(data).__name__


def infer_task(batches: Batches, num_classes: int, name: str = "user") -> Task:
    """The task of user data without one: classification into ``num_classes`` classes; the input shape
    is a single tensor input's per-sample shape (``()`` for several or keyword inputs)."""
    if batches.task is not None:
        return batches.task
    first = batches.head(1).x
    shape = tuple(int(d) for d in first.shape[1:]) if is_tensor_input(first) and first.is_floating_point() else ()
    return Task(name=name, kind="classification", num_classes=int(num_classes), input_shape=shape)
