"""``slimfuse demo``: the main job on the embedded default data (mnist5k).

Trains LeNet-300-100, saves it, reloads it from disk and measures it; writes
``report.md`` and ``report.json`` into the output folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import data as datasets
from ..measure import Report, measure
from ..models import load, save, zoo
from ..train import evaluate, fit
from .report import write_report


def run(out: str | Path = "runs/demo", *, seed: int = 0, progress: bool | None = None, seconds: float = 1.0) -> Report:
    out = Path(out)
    splits = datasets.load("mnist5k", seed=seed)
    torch.manual_seed(seed)
    teacher = fit(zoo.for_task("mlp", splits.task, hidden=[300, 100]), splits, epochs=20, seed=seed, progress=progress)
    save(teacher, out / "teacher", metrics={"val": evaluate(teacher, splits.val), "test": evaluate(teacher, splits.test)})
    models = {"teacher (LeNet-300-100)": load(out / "teacher")}
    models.update(prune_step(teacher, splits, out, seed=seed, progress=progress))
    report = measure(models, splits.test, seconds=seconds)
    write_report(report, out, title="slimfuse demo: mnist5k", sections=[
        ("Setup", f"mnist5k test split ({len(splits.test)} images); latency with 2 threads, torch eager."),
    ])
    return report


def prune_step(teacher, splits, out: Path, *, seed: int = 0, progress: bool | None = None) -> dict:
    """90% magnitude sparsity (AGP) and half the neurons removed, each saved and reloaded from disk."""
    from ..compress.prune import prune

    pruned = {
        "pruned 90% (agp, sparse-zstd)": ("pruned-90", prune(teacher, sparsity=0.9, data=splits, finetune_epochs=4,
                                                                seed=seed, progress=progress)),
        "pruned channels 50%": ("pruned-channels-50", prune(teacher, channels=0.5, data=splits, finetune_epochs=3,
                                                             seed=seed, progress=progress)),
    }
    for folder, model in pruned.values():
        save(model, out / folder, metrics={"test": evaluate(model, splits.test)})
    return {name: load(out / folder) for name, (folder, _) in pruned.items()}
