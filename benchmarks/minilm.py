"""Compressing all-MiniLM-L6-v2: slimfuse's variants side by side with torch fp32 and ONNX Runtime's own int8.

One run, 2 threads, on the built-in generated corpus (``sentences``): calibration, mixed-precision
search and distillation use the training/validation sentences, every row is measured on held-out
test sentences. Per row: sentences/s at batch 1 and 32, bytes on disk, fidelity to the fp32
embeddings (mean / min cosine, top-10 neighbour agreement, Spearman of pairwise similarities) and
topic 1-NN accuracy. The baseline "onnxruntime's own" is ONNX Runtime's BERT optimizer followed by
``quantize_dynamic(per_channel=True)``, called here directly. Target: >= 2.5x the torch fp32
throughput at batch 32 with mean cosine >= 0.995. slimfuse's compressed artifacts are saved and
reloaded before they are measured.

    python benchmarks/minilm.py            # writes benchmarks/out/minilm.{json,md}
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import onnx
import torch

import slimfuse as sf
from slimfuse import nlp
from slimfuse.export import to_onnx
from slimfuse.hardware import summary
from slimfuse.nlp.sentences import sentences
from slimfuse.runtime import OnnxPredictor

OUT = Path(__file__).parent / "out"
TARGET_SPEEDUP, TARGET_COSINE = 2.5, 0.995


def ort_own_int8(fp32: OnnxPredictor, heads: int, hidden: int) -> OnnxPredictor:
    """ONNX Runtime's recipe, no slimfuse: transformer optimizer, then per-channel dynamic int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, redirect_stdout(io.StringIO()):
        src, opt, out = Path(tmp) / "a.onnx", Path(tmp) / "opt.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(fp32.model_bytes())
        optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden).save_model_to_file(str(opt))
        quantize_dynamic(str(opt), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return OnnxPredictor.from_bytes(out.read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=1600, help="corpus size (train 60%%, val 15%%, test 25%%)")
    ap.add_argument("--epochs", type=int, default=3, help="distillation epochs")
    ap.add_argument("--seconds", type=float, default=1.5, help="timing budget per row")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    splits = sentences(n=args.sentences, seed=args.seed, val=0.15, test=0.25)
    calib = splits.val.subset(range(min(128, len(splits.val))))
    teacher = sf.nlp.minilm()
    timings: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        return out

    graph = timed("export + ORT optimizer", lambda: nlp.ort_transformer(teacher, calib))
    mixed = timed("mixed search", lambda: nlp.mixed(teacher, calib, max_drop=100 * (1 - TARGET_COSINE), graph=graph))
    student = timed("distill 3 layers", lambda: nlp.distill_layers(teacher, splits, layers=3, epochs=args.epochs,
                                                                     seed=args.seed))
    student_graph = nlp.ort_transformer(student, calib)
    refused: dict[str, str] = {}  # rows whose step refused its result (the validation gate), with its reason

    def build(name, fn):
        try:
            return fn()
        except sf.SlimfuseError as e:
            refused[name] = str(e)
            return None

    built = {
        # half precision computed natively where the CPU has the unit (AMX-BF16, AVX512-FP16), timed against
        # fp32 on the calibration sentences by quantize itself (the lineage's ``compute``)
        "slimfuse torch bf16": sf.quantize(teacher, "bf16", calib=calib),
        "slimfuse torch fp16": sf.quantize(teacher, "fp16", calib=calib),
        "slimfuse torch int8-dynamic": nlp.int8(teacher, backend="torch"),
        "slimfuse torch int8-static": build("slimfuse torch int8-static",
                                            lambda: nlp.int8(teacher, calib, backend="torch", mode="static")),
        "slimfuse onnxruntime int8-dynamic": nlp.int8(teacher, calib, graph=graph),
        "slimfuse onnxruntime int8-static": nlp.int8(teacher, calib, mode="static", graph=graph),
        f"slimfuse onnxruntime mixed (cos>={TARGET_COSINE} on val)": mixed,
        "slimfuse 3-layer distilled (torch)": student,
        "slimfuse 3-layer distilled onnxruntime int8-static": nlp.int8(student, calib, mode="static",
                                                                       graph=student_graph),
        "slimfuse 3-layer distilled onnxruntime int8-dynamic": nlp.int8(student, calib, graph=student_graph),
    }
    built = {n: m for n, m in built.items() if m is not None}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model) in enumerate(list(built.items())):  # measure what is deployed: the reloaded artifact
            sf.save(model, Path(tmp) / str(i))
            back = sf.load(Path(tmp) / str(i))
            assert torch.equal(nlp.embed(back, calib.x), nlp.embed(model, calib.x)), name
            built[name] = back
        fp32_onnx = to_onnx(teacher, sample=calib)
        models = {
            "torch fp32": teacher,
            "onnxruntime fp32 (plain export)": fp32_onnx,
            "onnxruntime fp32 (fused graph)": graph,
            "onnxruntime's own int8 (optimizer + quantize_dynamic per-channel)": ort_own_int8(fp32_onnx, 12, 384),
            **built,
        }
        report = timed("measure", lambda: nlp.measure_encoders(models, splits.test, nlp.fidelity_score(teacher),
                                                               seconds=args.seconds))
    base = report.row("torch fp32")["throughput_b32"]
    for r in report.rows:
        r["speedup_b32"] = r["throughput_b32"] / base
        r["meets_target"] = bool(r["speedup_b32"] >= TARGET_SPEEDUP and r["mean_cosine"] >= TARGET_COSINE)
    keep = mixed.slimfuse["lineage"][-1]["params"]["keep"]
    compute = {n: sf.lineage_of(built[n])[-1]["params"]["compute"]
               for n in ("slimfuse torch bf16", "slimfuse torch fp16")}
    lines = ["| model | b1 sent/s | b32 sent/s | x torch fp32 (b32) | bytes | mean cos | min cos | top-10 agree | "
             "Spearman | topic 1-NN | target |", "|" + "---|" * 11]
    for r in report.rows:
        lines.append(f"| {r['name']} | {r['throughput_b1']:,.0f} | {r['throughput_b32']:,.0f} | "
                     f"{r['speedup_b32']:.2f} | {r['bytes']:,} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | "
                     f"{r['topk_agreement']:.3f} | {r['spearman']:.4f} | {r['topic_knn_accuracy']:.3f} | "
                     f"{'met' if r['meets_target'] else 'missed'} |")
    lines += ["", f"{len(splits.test)} test sentences (padded to {splits.test.x.shape[1]} tokens), 2 threads. Mixed "
              f"precision kept in float: {', '.join(keep)}. Half precision computed in: {compute}. Stage seconds: "
              f"{timings}; total {time.perf_counter() - t0:.0f} s."]
    lines += [f"Refused by its step: {n}: {why}" for n, why in refused.items()]
    OUT.mkdir(exist_ok=True)
    (OUT / "minilm.md").write_text("\n".join(lines) + "\n")
    result = {"rows": report.rows, "timings": timings, "mixed_keep": keep, "half_compute": compute, "refused": refused,
              "hardware": summary()}
    (OUT / "minilm.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
