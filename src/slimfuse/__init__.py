"""slimfuse: make trained neural networks smaller, faster and better.

Everything that predicts is a ``torch.nn.Module``; every technique is a
function ``Module -> Module`` that never mutates its input.
"""

from . import _env  # noqa: F401  (first: keeps run-time caches out of $HOME)
from . import data, runtime  # runtime registers the "onnx" architecture for artifacts
from . import nlp  # sentence encoders (pretrained weights and tokenizer need slimfuse[nlp])
from . import recsys  # registers the mf, two-tower, qtables and rec-ensemble architectures
from . import data as datasets
from ._version import __version__
from .compress.distill import distill
from .compress.prune import prune  # also registers the sparse-zstd storage codec
from .compress.quantize import quantize  # also registers every scheme and its codecs
from .compress.sparse_kernel import sparse_kernels  # also registers the sparse-kernels architecture
from .data import Split, Splits, Task
from .errors import ArtifactError, ConfigError, DataError, SlimfuseError
from .export import export
from .fuse import Ensemble, ensemble, soup, swa, train_members
from .hardware import hardware
from .measure import Report, measure
from .models import load, read_card, save, zoo
from .models.spec import lineage_of, spec_of
from .search import optimize
from .train import evaluate, fit, predict

__all__ = [
    "ArtifactError", "ConfigError", "DataError", "Ensemble", "Report", "SlimfuseError", "Split", "Splits",
    "Task", "__version__", "data", "datasets", "distill", "ensemble", "evaluate", "export", "fit", "hardware",
    "lineage_of", "load", "measure", "nlp", "optimize", "predict", "prune", "quantize", "read_card", "recsys",
    "runtime", "save", "soup", "sparse_kernels", "spec_of", "swa", "train_members", "zoo",
]
