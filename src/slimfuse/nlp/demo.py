"""``slimfuse demo --scenario nlp``: compress a real pretrained sentence encoder (all-MiniLM-L6-v2).

A few hundred generated sentences: the encoder in fp32 (torch and ONNX Runtime's fused graph),
dynamic int8 in torch and ONNX Runtime, static int8 (weight MatMuls and embeddings), mixed precision (the most
sensitive layers in float until the mean cosine to fp32 reaches 0.995), and a 3-layer student
distilled from every other layer, alone and in int8. The mixed and distilled artifacts are saved and
reloaded before being measured: sentences/s at batch 1 and 32, bytes on disk, fidelity to the fp32
embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..compress.quantize import quantize
from ..measure import Report
from ..models import load, save
from ..models.spec import lineage_of
from ..report import write_report
from .compress import distill_layers, int8, mixed, ort_transformer
from .fidelity import fidelity_score
from .measure import measure_encoders
from .minilm import minilm
from .sentences import sentences


def run(out: str | Path = "runs/demo-nlp", *, seed: int = 0, seconds: float = 0.6) -> Report:
    out = Path(out)
    torch.manual_seed(seed)
    splits = sentences(n=640, seed=seed, val=0.15, test=0.25)  # 384 train, 96 val, 160 test sentences
    teacher = minilm()
    graph = ort_transformer(teacher, splits.val)
    mix = mixed(teacher, splits.val, max_drop=0.5, graph=graph, samples=48)
    student = distill_layers(teacher, splits, layers=3, epochs=3, seed=seed)
    save(mix, out / "minilm-mixed")
    save(student, out / "minilm-3layer")
    student = load(out / "minilm-3layer")
    models = {
        "MiniLM-L6 fp32 (torch)": teacher,
        "MiniLM-L6 fp32 (onnxruntime, fused)": graph,
        "MiniLM-L6 int8-dynamic (torch)": int8(teacher, backend="torch"),
        "MiniLM-L6 int8-dynamic (onnxruntime)": quantize(graph, "int8-dynamic", backend="onnxruntime"),
        "MiniLM-L6 int8-static (onnxruntime)": int8(teacher, splits.val, mode="static", graph=graph),
        "MiniLM-L6 mixed int8 (onnxruntime)": load(out / "minilm-mixed"),
        "MiniLM-L3 distilled (torch)": student,
        "MiniLM-L3 distilled int8-dynamic (onnxruntime)": int8(student, splits.val),
    }
    report = measure_encoders(models, splits.test, fidelity_score(teacher, splits.test), seconds=seconds)
    step = lineage_of(mix)[-1]["params"]
    ranked = sorted(step["sensitivity"].items(), key=lambda kv: -kv[1])[:8]
    write_report(report, out, title="slimfuse demo: compressing all-MiniLM-L6-v2", sections=[
        ("Setup", f"{len(splits.test)} generated test sentences (seed {seed}); fidelity is measured against the fp32 "
                  f"torch embeddings; sentences/s with 2 threads at batch 1 and 32. The student was distilled on "
                  f"{len(splits.train)} sentences for 3 epochs (cosine + squared distance), from layers 0, 2, 4."),
        ("Mixed precision", f"Kept in float (target mean cosine {step['target']}, reached {step['achieved']:.4f} on "
                            f"the validation sentences): {', '.join(step['keep']) or 'none'}.\nMost sensitive layers "
                            "(mean-cosine drop when quantized alone):\n"
                            + "\n".join(f"  {p}: {d:.5f}" for p, d in ranked)),
    ])
    return report
