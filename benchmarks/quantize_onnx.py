"""Quantization with ONNX Runtime and codebooks, side by side, on mnist5k.

For LeNet-300-100 and LeNet-5: torch fp32, ONNX Runtime fp32, slimfuse's ORT int8 (dynamic, static
QDQ, static QOperator) vs ONNX Runtime's own ``quantize_dynamic`` / ``quantize_static`` called
directly with their defaults, ``codebook:2..8``, and prune (``slimfuse.prune``, gradual global
magnitude) -> codebook -> entropy. Every row is
measured by ``slimfuse.measure`` (accuracy, bytes, latency); a second table times batch 256
round-robin (several rounds, median) so that noise from other processes hits every row alike.

    .venv/bin/python benchmarks/quantize_onnx.py [--quick]

Writes benchmarks/out/quantize_onnx.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import slimfuse as sf
from slimfuse.export import to_onnx
from slimfuse.measure import latency
from slimfuse.runtime import OnnxPredictor

OUT = Path(__file__).parent / "out"


def ort_own(fp32: OnnxPredictor, calib: torch.Tensor, kind: str) -> OnnxPredictor:
    """ONNX Runtime's own quantizer, called directly with its defaults (what a user would do)."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    class Reader:
        def __init__(self):
            self.it = iter([{fp32._io["input"]: fp32.feed(calib[i:i + 64])} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32.model_bytes())
        if kind == "dynamic":
            quantize_dynamic(src, dst)
        else:
            quantize_static(src, dst, Reader())
        return OnnxPredictor.from_bytes(dst.read_bytes())


def bench(arch: str, data, *, epochs: int, sparsity: float, quick: bool) -> tuple[list[dict], list[dict]]:
    torch.manual_seed(0)
    t0 = time.time()
    fp32 = sf.fit(sf.zoo.for_task(arch, data.task), data, epochs=epochs, seed=0)
    print(f"[{arch}] trained in {time.time() - t0:.0f}s", flush=True)
    calib = data.val.x[:512]
    ort32 = to_onnx(fp32, sample=data.val)
    models = {
        "torch fp32": fp32,
        "ORT fp32": ort32,
        "slimfuse ORT int8-dynamic": sf.quantize(ort32, "int8-dynamic", backend="onnxruntime"),
        "slimfuse ORT int8-static (QDQ)": sf.quantize(ort32, "int8-static", data.val, backend="onnxruntime"),
        "slimfuse ORT int8-static (QOperator)": sf.quantize(ort32, "int8-static", data.val, backend="onnxruntime",
                                                            format="qoperator"),
        "ORT own quantize_dynamic": ort_own(ort32, calib, "dynamic"),
        "ORT own quantize_static": ort_own(ort32, calib, "static"),
    }
    for bits in ([4] if quick else range(2, 9)):
        models[f"codebook:{bits}"] = sf.quantize(fp32, f"codebook:{bits}", data=data, epochs=1)
    t0 = time.time()
    pruned = sf.prune(fp32, sparsity=sparsity, data=data, epochs=2 if quick else 8, seed=0)
    models[f"pruned {sparsity:.0%} (slimfuse.prune)"] = pruned
    models["prune -> codebook:5 -> entropy"] = sf.quantize(pruned, "codebook:5", data=data, epochs=2)
    models["prune -> codebook:4 -> entropy"] = sf.quantize(pruned, "codebook:4", data=data, epochs=2)
    print(f"[{arch}] compressed in {time.time() - t0:.0f}s", flush=True)
    report = sf.measure(models, data.test, seconds=0.5)
    base = report.row("torch fp32")
    rows = []
    for r in report.rows:
        r = {**r, "arch": arch}
        r["acc_delta_pt"] = 100 * (r["accuracy"] - base["accuracy"])
        r["smaller_x"] = base["bytes"] / r["bytes"]
        r["b256_speedup_x"] = base["latency_b256_ms"] / r["latency_b256_ms"]
        rows.append(r)
    # round-robin batch-256 timing of the runtime rows: every round times every model once
    timed = [n for n in models if not n.startswith(("codebook", "prune"))]
    with warnings.catch_warnings():  # torch.ao is deprecated in torch 2.13 but still the eager int8 path
        warnings.simplefilter("ignore")
        models["torch.ao quantize_dynamic (direct)"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    timed.append("torch.ao quantize_dynamic (direct)")
    rounds = {n: [] for n in timed}
    for _ in range(3 if quick else 5):
        for n in timed:
            rounds[n].append(latency(models[n], data.test.x, seconds=0.2)["latency_b256_ms"])
    speed = [{"arch": arch, "name": n, "b256_ms": float(np.median(v)),
              "speedup_vs_torch_fp32": float(np.median(rounds["torch fp32"]) / np.median(v))}
             for n, v in rounds.items()]
    return rows, speed


def to_markdown(rows: list[dict], speed: list[dict]) -> str:
    head = ("| model | arch | runtime | accuracy | Δ pt | bytes | smaller | b1 p50 ms | b256 ms | b256 speed-up |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['name']} | {r['arch']} | {r['runtime']} | {r['accuracy']:.4f} | {r['acc_delta_pt']:+.2f} | "
        f"{r['bytes']:,} | {r['smaller_x']:.1f}x | {r['latency_b1_p50_ms']:.3f} | {r['latency_b256_ms']:.3f} | "
        f"{r['b256_speedup_x']:.2f}x |\n" for r in rows)
    rr = ("\nRound-robin batch-256 latency (median over rounds):\n\n"
          "| model | arch | b256 ms | speed-up vs torch fp32 |\n"
          "|---|---|---|---|\n")
    rr += "".join(f"| {s['name']} | {s['arch']} | {s['b256_ms']:.3f} | {s['speedup_vs_torch_fp32']:.2f}x |\n"
                  for s in speed)
    return head + body + rr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer epochs and rows (smoke run)")
    args = ap.parse_args()
    data = sf.datasets.load("mnist5k")
    rows, speed = [], []
    for arch, epochs, sparsity in (("mlp", 20, 0.95), ("lenet5", 8, 0.85)):
        r, s = bench(arch, data, epochs=2 if args.quick else epochs, sparsity=sparsity, quick=args.quick)
        rows += r
        speed += s
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quantize_onnx.json").write_text(json.dumps({"rows": rows, "round_robin": speed}, indent=2))
    md = to_markdown(rows, speed)
    (OUT / "quantize_onnx.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
