"""Models: the zoo, specs that rebuild architectures, and safe artifacts."""

from . import shrunk as _shrunk  # noqa: F401  (registers the "pruned" architecture)
from . import zoo
from .artifact import folder_bytes, load, read_card, register_codec, save
from .spec import attach, derive, lineage_of, lineage_str, spec_of, task_of

__all__ = [
    "attach", "derive", "folder_bytes", "lineage_of", "lineage_str", "load", "read_card",
    "register_codec", "save", "spec_of", "task_of", "zoo",
]
