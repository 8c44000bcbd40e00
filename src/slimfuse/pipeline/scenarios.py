"""The demo's scenarios: ``slimfuse demo --scenario NAME``.

Each entry names a ``run(out, *, seed) -> Report`` function, imported only when
chosen, so a scenario's optional dependencies (``slimfuse[nlp]``) stay optional.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import ConfigError
from ..measure import Report

SCENARIOS: dict[str, tuple[str, str]] = {
    "mnist": ("slimfuse.pipeline.demo:run", "image classification on mnist5k: every technique and the full chain"),
    "vision": ("slimfuse.pipeline.vision:run", "image classification with a ResNet on mnist5k: train, export, "
                                                "prune channels, int8, ensemble, distill, measured"),
    "recsys": ("slimfuse.recsys.demo:run", "recommenders: quantized tables, pruning, distillation, ensembles"),
    "nlp": ("slimfuse.nlp.demo:run", "sentence embeddings: all-MiniLM-L6-v2 in int8, mixed precision, "
                                              "distilled to 3 layers (needs slimfuse[nlp])"),
}


def run_scenario(name: str, out: str | Path | None = None, *, seed: int = 0) -> tuple[Report, Path]:
    """Run one scenario into ``out`` (default ``runs/demo`` for mnist, ``runs/demo-NAME`` otherwise)."""
    if name not in SCENARIOS:
        raise ConfigError(f"unknown scenario {name!r}; choose one of {', '.join(sorted(SCENARIOS))}")
    out = Path(out) if out is not None else Path("runs/demo" if name == "mnist" else f"runs/demo-{name}")
    module, func = SCENARIOS[name][0].split(":")
    return getattr(importlib.import_module(module), func)(out, seed=seed), out
