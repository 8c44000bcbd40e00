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
    models.update(quantize_step(teacher, splits, out))
    report = measure(models, splits.test, seconds=seconds)
    write_report(report, out, title="slimfuse demo: mnist5k", sections=[
        ("Setup", f"mnist5k test split ({len(splits.test)} images); latency with 2 threads, torch eager."),
    ])
    return report


def quantize_step(teacher, splits, out: Path) -> dict:
    """int8-static quantization of the teacher (percentile calibration), saved and reloaded."""
    from ..compress.quantize import quantize

    q8 = quantize(teacher, "int8-static", calib=splits)
    save(q8, out / "teacher-int8", metrics={"val": evaluate(q8, splits.val), "test": evaluate(q8, splits.test)})
    return {"teacher int8-static": load(out / "teacher-int8")}
