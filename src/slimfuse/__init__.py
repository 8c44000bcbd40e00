"""slimfuse: make trained neural networks smaller, faster and better.

Everything that predicts is a ``torch.nn.Module``; every technique is a
function ``Module -> Module`` that never mutates its input.
"""

from . import _env  # noqa: F401  (first: keeps run-time caches out of $HOME)
from . import data
from . import data as datasets
from ._version import __version__
from .compress.distill import distill
from .data import Split, Splits, Task
from .compress.quantize import quantize
from .errors import ArtifactError, ConfigError, DataError, SlimfuseError
from .fuse import Ensemble, ensemble, soup, swa, train_members
from .measure import Report, measure
from .models import load, read_card, save, zoo
from .models.spec import lineage_of, spec_of
from .train import evaluate, fit, predict
from .compress.prune import prune  # noqa: E402  (also registers the sparse-zstd storage codec)
from . import runtime  # noqa: E402  (registers the "onnx" architecture for artifacts)
from .export import export  # noqa: E402

__all__ = [
    "ArtifactError", "ConfigError", "DataError", "Report", "SlimfuseError", "Split", "Splits", "Task",
    "__version__", "data", "datasets", "evaluate", "fit", "lineage_of", "load", "measure", "predict",
    "read_card", "save", "spec_of", "zoo",
    "prune", "quantize", "export", "runtime",
]
__all__ += ["distill", "Ensemble", "ensemble", "soup", "swa", "train_members"]
