"""slimfuse: make trained neural networks smaller, faster and better.

Everything that predicts is a ``torch.nn.Module``; every technique is a function
``Module -> Module`` that never mutates its input.

The names below are imported on first use (PEP 562), so ``import slimfuse`` and the command
line's ``--help`` stay light; ``slimfuse.prune`` imports the pruning module when first touched.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from . import _env  # noqa: F401  (first: keeps run-time caches out of $HOME)
from ._version import __version__
from .errors import ArtifactError, ConfigError, DataError, SlimfuseError

# public name -> (module, attribute); attribute None: the module itself
_LAZY = {
    "configs": ("slimfuse.configs", None),
    "data": ("slimfuse.data", None),
    "datasets": ("slimfuse.data", None),
    "runtime": ("slimfuse.runtime", None),
    "nlp": ("slimfuse.nlp", None),
    "recsys": ("slimfuse.recsys", None),
    "zoo": ("slimfuse.models.zoo", None),
    "distill": ("slimfuse.compress.distill", "distill"),
    "prune": ("slimfuse.compress.prune", "prune"),
    "quantize": ("slimfuse.compress.quantize", "quantize"),
    "Split": ("slimfuse.data", "Split"),
    "Splits": ("slimfuse.data", "Splits"),
    "Task": ("slimfuse.data", "Task"),
    "export": ("slimfuse.export", "export"),
    "hardware": ("slimfuse.hardware", "hardware"),
    "sparse_kernels": ("slimfuse.compress.sparse_kernel", "sparse_kernels"),
    "Ensemble": ("slimfuse.fuse", "Ensemble"),
    "ensemble": ("slimfuse.fuse", "ensemble"),
    "merge": ("slimfuse.fuse.merge", "merge"),
    "soup": ("slimfuse.fuse", "soup"),
    "swa": ("slimfuse.fuse", "swa"),
    "train_members": ("slimfuse.fuse", "train_members"),
    "Report": ("slimfuse.measure", "Report"),
    "measure": ("slimfuse.measure", "measure"),
    "load": ("slimfuse.models", "load"),
    "read_card": ("slimfuse.models", "read_card"),
    "save": ("slimfuse.models", "save"),
    "lineage_of": ("slimfuse.models.spec", "lineage_of"),
    "spec_of": ("slimfuse.models.spec", "spec_of"),
    "optimize": ("slimfuse.search", "optimize"),
    "evaluate": ("slimfuse.train", "evaluate"),
    "fit": ("slimfuse.train", "fit"),
    "predict": ("slimfuse.train", "predict"),
    "feed": ("slimfuse.data.feed", "feed"),
    "set_output": ("slimfuse.models.calling", "set_output"),
    "from_keras": ("slimfuse.models.keras", "from_keras"),
}

__all__ = [
    "ArtifactError", "ConfigError", "DataError", "Ensemble", "Report", "SlimfuseError", "Split", "Splits",
    "Task", "__version__", "configs", "data", "datasets", "distill", "ensemble", "evaluate", "export", "feed", "fit",
    "from_keras", "hardware",
    "lineage_of", "load", "measure", "merge", "nlp", "optimize", "predict", "prune", "quantize", "read_card", "recsys",
    "runtime", "save", "set_output", "soup", "sparse_kernels", "spec_of", "swa", "train_members", "zoo",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'slimfuse' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """Keeps ``slimfuse.export`` and ``slimfuse.measure`` the functions: importing the submodules of the same
    names must not replace them (the import system sets a package attribute per submodule)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name, (None, None))[1] is not None:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import configs, data, nlp, recsys, runtime
    from . import data as datasets
    from .compress.distill import distill
    from .compress.prune import prune
    from .compress.quantize import quantize
    from .compress.sparse_kernel import sparse_kernels
    from .data import Split, Splits, Task
    from .export import export
    from .fuse import Ensemble, ensemble, train_members
    from .fuse.merge import merge
    from .fuse.soup import soup, swa
    from .hardware import hardware
    from .measure import Report, measure
    from .models import load, read_card, save, zoo
    from .models.spec import lineage_of, spec_of
    from .search import optimize
    from .train import evaluate, fit, predict
