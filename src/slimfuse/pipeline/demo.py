"""``slimfuse demo``: the main job on the embedded default data (mnist5k).

Trains LeNet-300-100, saves it, reloads it from disk and measures it; writes
``report.md``, ``report.html`` and ``report.json`` into the output folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import data as datasets
from ..measure import Report, measure
from ..models import load, save, zoo
from ..report import write_report
from ..train import evaluate, fit
from . import demo_chain as chain

TEACHER = "teacher (LeNet-300-100)"


def run(out: str | Path = "runs/demo", *, seed: int = 0, progress: bool | None = None, seconds: float = 1.0) -> Report:
    out = Path(out)
    splits = datasets.load("mnist5k", seed=seed)
    torch.manual_seed(seed)
    teacher = fit(zoo.for_task("mlp", splits.task, hidden=[300, 100]), splits, epochs=20, seed=seed, progress=progress)
    save(teacher, out / "teacher",
         metrics={"val": evaluate(teacher, splits.val), "test": evaluate(teacher, splits.test)})
    models = {TEACHER: load(out / "teacher")}
    sections = []

    def add(step):
        rows, section = step
        models.update(rows)
        sections.append(section)

    add(distill_step(teacher, splits, out, seed=seed, progress=progress))
    models.update(onnx_and_codebook_step(models[TEACHER], splits, out, seed=seed))
    models.update(prune_step(teacher, splits, out, seed=seed, progress=progress))
    models.update(quantize_step(teacher, splits, out))
    pruned = models["pruned 90% (agp, sparse-zstd)"]
    add(chain.staged_compression(teacher, pruned, splits, out, seed=seed))
    add(chain.sparse_vs_dense(pruned, splits, seed=seed, progress=progress))
    members = chain.train_members(teacher, splits, seed=seed, progress=progress)
    add(chain.ensemble_evidence(members, splits, seed=seed))
    add(chain.soup_evidence(teacher, splits, seed=seed, progress=progress))
    models.update(chain.chain_step(members, splits, out, seed=seed, progress=progress))
    report = measure(models, splits.test, seconds=seconds)
    sections.insert(0, chain.chain_verdict(report, TEACHER, "chain 4: int8-static (ONNX Runtime)"))
    write_report(report, out, title="slimfuse demo: mnist5k", sections=[
        ("Setup", f"mnist5k test split ({len(splits.test)} images); latency with 2 threads; runtime per row "
                  f"(torch eager or ONNX Runtime). Every model was saved and reloaded from disk, except the "
                  f"in-memory comparison rows of the evidence tables."),
        *sections,
    ])
    return report


def distill_step(teacher, splits, out: Path, *, seed: int, progress: bool | None) -> tuple[dict, tuple[str, str]]:
    """Distill the teacher into a 784-32-10 MLP. The comparison row is the same student trained
    alone, with labels, for the same number of steps on a transfer set of the same size (the
    training split plus 2 jittered copies; the distilled student's set swaps one copy for
    unlabeled mixup blends, which only a teacher can label)."""
    from ..compress.distill import distill, transfer_set

    torch.manual_seed(seed)
    student = zoo.for_task("mlp", splits.task, hidden=[32])
    budget = {"epochs": 10, "batch_size": 128, "lr": 2e-3, "schedule": "cosine", "seed": seed, "progress": progress}
    alone = fit(student, splits, train=transfer_set(splits, "augment", copies=2, seed=seed), **budget)
    distilled = distill(teacher, student, splits, temperature=4.0, alpha=0.9, transfer="augment", copies=1,
                        mixup=1.0, **budget)
    save(distilled, out / "student-distilled", metrics={"test": evaluate(distilled, splits.test)})
    acc = {k: evaluate(m, splits.test)["accuracy"] for k, m in
           {"teacher": teacher, "alone": alone, "distilled": distilled}.items()}
    gap = acc["teacher"] - acc["alone"]
    closed = (f"{(acc['distilled'] - acc['alone']) / gap:.0%} of the student-teacher accuracy gap closed"
              if gap > 0 else "the student alone already matches the teacher: no gap to close")
    claim, iv = chain.vs(distilled, alone, splits.test, seed=seed)
    closed += (f"; distilled beats alone: {claim} (paired accuracy difference {100 * iv.diff:+.1f} pt, "
               f"95% interval [{100 * iv.lo:+.1f}, {100 * iv.hi:+.1f}])")
    n = len(splits.train)
    body = (f"Teacher LeNet-300-100 -> student 784-32-10 (T=4, alpha=0.9, 10 epochs of {3 * n:,} samples each: "
            f"alone on the training split + 2 jittered noisy copies, distilled on the split + 1 copy + {n:,} "
            f"mixup blends). Test accuracy: teacher {acc['teacher']:.4f}, student alone {acc['alone']:.4f}, "
            f"distilled {acc['distilled']:.4f}: {closed}. This teacher is trained without dropout or "
            f"jitter, so its soft targets carry little beyond the labels; `benchmarks/distill.py` measures "
            f"distillation from a regularized teacher.")
    rows = {"student 784-32-10 alone": alone, "student 784-32-10 distilled": load(out / "student-distilled")}
    return rows, ("Distillation", body)


def onnx_and_codebook_step(teacher, splits, out: Path, *, seed: int = 0) -> dict:
    """Teacher -> ONNX (fp32) and ONNX Runtime int8 files; teacher -> codebook:5 artifact (each reloaded)."""
    from ..compress.quantize import quantize
    from ..export import export
    from ..runtime import load_onnx

    export(teacher, "onnx", out / "teacher.onnx", sample=splits.val)
    int8 = quantize(load_onnx(out / "teacher.onnx"), "int8-static", calib=splits.val, backend="onnxruntime")
    export(int8, "onnx", out / "teacher-int8.onnx")
    shared = quantize(teacher, "codebook:5", data=splits, epochs=1, seed=seed)
    save(shared, out / "codebook5", metrics={"test": evaluate(shared, splits.test)})
    return {
        "teacher ONNX fp32": load_onnx(out / "teacher.onnx"),
        "teacher ONNX int8-static": load_onnx(out / "teacher-int8.onnx"),
        "teacher codebook:5": load(out / "codebook5"),
    }


def prune_step(teacher, splits, out: Path, *, seed: int = 0, progress: bool | None = None) -> dict:
    """90% magnitude sparsity (AGP) and half the neurons removed, each saved and reloaded from disk."""
    from ..compress.prune import prune

    pruned = {
        "pruned 90% (agp, sparse-zstd)": ("pruned-90", prune(teacher, sparsity=0.9, data=splits, epochs=4,
                                                                seed=seed, progress=progress)),
        "pruned channels 50%": ("pruned-channels-50", prune(teacher, channels=0.5, data=splits, epochs=3,
                                                             seed=seed, progress=progress)),
    }
    for folder, model in pruned.values():
        save(model, out / folder, metrics={"test": evaluate(model, splits.test)})
    return {name: load(out / folder) for name, (folder, _) in pruned.items()}
def quantize_step(teacher, splits, out: Path) -> dict:
    """int8-static quantization of the teacher in torch (fbgemm kernels, percentile calibration),
    saved and reloaded; the ONNX Runtime int8 row comes from ``onnx_and_codebook_step``."""
    from ..compress.quantize import quantize

    q8 = quantize(teacher, "int8-static", calib=splits, backend="torch")
    save(q8, out / "teacher-int8", metrics={"val": evaluate(q8, splits.val), "test": evaluate(q8, splits.test)})
    return {"teacher int8-static (torch)": load(out / "teacher-int8")}
