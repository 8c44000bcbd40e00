"""Keep run-time caches out of the user's home directory.

matplotlib, ONNX Runtime (via XDG_CACHE_HOME) and TorchInductor write caches
on first use. Unless the user chose a location, send them to a per-user
folder in the system temp dir. Imported first by ``slimfuse/__init__``.
"""

import os
import tempfile

_ROOT = os.path.join(tempfile.gettempdir(), f"slimfuse-cache-{os.getuid()}")

for _var, _sub in (
    ("MPLCONFIGDIR", "matplotlib"),
    ("XDG_CACHE_HOME", "xdg"),
    ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
):
    os.environ.setdefault(_var, os.path.join(_ROOT, _sub))
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
