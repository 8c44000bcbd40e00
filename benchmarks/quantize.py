"""Quantization benchmark: every torch scheme vs torch.ao's quantize_dynamic and eager fp32.

LeNet-300-100, LeNet-5 and a Hugging Face ResNet (residual blocks written as forward code, not
``nn.Sequential``) on mnist5k; per candidate: test accuracy, bytes on disk, batch-1
p50 latency and batch-256 latency, all in one run so the numbers compare side by side. slimfuse
candidates are measured after a save -> load round trip (what is deployed), which must give
bit-identical predictions. Latency is the best of several interleaved rounds (the machine is
shared; the best round is the least disturbed one).

Candidates are a list of named builders; other backends add theirs to CANDIDATES.

    python benchmarks/quantize.py            # writes benchmarks/out/quantize.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import slimfuse as sf
from slimfuse.measure import artifact_bytes, latency
from slimfuse.models.calling import forward

OUT = Path(__file__).parent / "out"
THREADS = 2


@dataclass
class Context:
    model: nn.Module  # the trained fp32 model
    data: sf.Splits
    tmp: Path


@dataclass
class Candidate:
    name: str
    runtime: str
    build: Callable[[Context], nn.Module]
    reload: bool = True  # measure the saved-and-reloaded artifact


def _ao_dynamic(ctx: Context) -> nn.Module:
    """torch.ao's own dynamic int8 (deprecated in torch 2.13, still working); ships as a pickle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        q = quantize_dynamic(ctx.model, {nn.Linear}, dtype=torch.qint8)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    object.__setattr__(q, "slimfuse_artifact_bytes", lambda n=len(buf.getvalue()): n)
    return q


class _NativeHalf(nn.Module):
    """The whole model in fp16 in eager torch (why slimfuse computes half-stored weights in fp32)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        stored = sf.quantize(model, "fp16")
        self.bytes = artifact_bytes(stored)  # the same weights as the fp16 artifact
        self.model = copy.deepcopy(stored).half()

    def forward(self, x):
        return forward(self.model, x.half()).float()

    def slimfuse_artifact_bytes(self):
        return self.bytes


def _q(scheme: str, **options) -> Callable[[Context], nn.Module]:
    return lambda ctx: sf.quantize(ctx.model, scheme, calib=ctx.data, backend="torch", **options)


def _unfolded(ctx: Context) -> nn.Module:
    """int8-static as before BatchNorm layers called from forward code were folded: the torch backend
    with no graph chains (only ``nn.Sequential`` children fold), for the ratio side by side."""
    from slimfuse.compress import quant_torch

    with mock.patch.object(quant_torch, "graph_chains", lambda model, x: {}):
        return sf.quantize(ctx.model, "int8-static", calib=ctx.data, backend="torch")


def hf_resnet(task: sf.Task) -> nn.Module:
    """A small transformers ``ResNetForImageClassification`` (basic blocks, BatchNorm), random init."""
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(
        num_channels=task.input_shape[0], embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
        layer_type="basic", num_labels=task.num_classes, downsample_in_first_stage=False))


CANDIDATES: list[Candidate] = [
    Candidate("fp32 (eager)", "torch", lambda ctx: ctx.model),
    Candidate("torch.ao quantize_dynamic (direct)", "torch", _ao_dynamic, reload=False),
    Candidate("int8-dynamic", "torch", _q("int8-dynamic")),
    Candidate("int8-static minmax", "torch", _q("int8-static", calibrator="minmax")),
    Candidate("int8-static percentile (default)", "torch", _q("int8-static", calibrator="percentile")),
    Candidate("int8-static entropy", "torch", _q("int8-static", calibrator="entropy")),
    Candidate("int8-static percentile, forward-code BatchNorm unfolded", "torch", _unfolded),
    Candidate("qat (3 epochs)", "torch", _q("qat", epochs=3)),
    Candidate("mixed (max_drop 0.5 pt, default)", "torch", _q("mixed", max_drop=0.5)),
    Candidate("fp16 (compute auto: measured)", "torch", _q("fp16")),
    Candidate("bf16 (compute auto: measured)", "torch", _q("bf16")),
    Candidate("fp16 native eager (.half())", "torch", lambda ctx: _NativeHalf(ctx.model), reload=False),
]

MODELS = {
    "LeNet-300-100": (lambda task: sf.zoo.for_task("mlp", task, hidden=[300, 100]), 20),
    "LeNet-5": (lambda task: sf.zoo.for_task("lenet5", task), 10),
    "HF ResNet": (hf_resnet, 6),
}


def run(rounds: int = 3, seconds: float = 0.4, epochs_scale: float = 1.0,
        models: list[str] | None = None) -> list[dict]:
    data = sf.datasets.load("mnist5k")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, (make, epochs) in MODELS.items():
            if models and model_name not in models:
                continue
            torch.manual_seed(0)
            fp32 = sf.fit(make(data.task), data, epochs=max(1, round(epochs * epochs_scale)), progress=False)
            ctx = Context(fp32, data, Path(tmp))
            built, refused = [], []
            for i, cand in enumerate(CANDIDATES):
                t0 = time.perf_counter()
                try:
                    model = cand.build(ctx)
                except sf.SlimfuseError as e:  # a scheme that refuses this model is a row too
                    print(f"{model_name:14s} {cand.name:36s} refused: {e}", flush=True)
                    refused.append({"model": model_name, "candidate": cand.name, "refused": str(e)})
                    continue
                build_s = time.perf_counter() - t0
                if cand.reload:
                    path = sf.save(model, Path(tmp) / f"{model_name}-{i}")
                    loaded = sf.load(path)
                    if not torch.equal(sf.predict(model, data.test), sf.predict(loaded, data.test)):
                        raise AssertionError(f"{cand.name}: reloaded artifact predicts differently")
                    model = loaded
                row = {"model": model_name, "candidate": cand.name, "runtime": cand.runtime,
                       "accuracy": sf.evaluate(model, data.test)["accuracy"], "bytes": artifact_bytes(model),
                       "build_s": build_s, "precision": getattr(model, "precision", None)}
                built.append((row, model))
            for _ in range(rounds):  # interleaved: every candidate sees the same machine state
                for row, model in built:
                    t = latency(model, data.test.x, threads=THREADS, seconds=seconds)
                    row["b1_ms"] = min(row.get("b1_ms", 1e9), t["latency_b1_p50_ms"])
                    row["b256_ms"] = min(row.get("b256_ms", 1e9), t["latency_b256_ms"])
            ref = built[0][0]
            for row, _ in built:
                row["acc_delta_pt"] = 100 * (row["accuracy"] - ref["accuracy"])
                row["bytes_ratio"] = ref["bytes"] / row["bytes"]
                row["speedup_b1"] = ref["b1_ms"] / row["b1_ms"]
                row["speedup_b256"] = ref["b256_ms"] / row["b256_ms"]
                rows.append(row)
                print(f"{model_name:14s} {row['candidate']:36s} acc {row['accuracy']:.4f} bytes {row['bytes']:>9,} "
                      f"b1 {row['b1_ms']:.3f} ms  b256 {row['b256_ms']:.3f} ms", flush=True)
            rows += refused
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = ("| model | candidate | runtime | test acc | Δ pt | bytes | × smaller | b1 p50 ms | b256 ms | "
            "× faster b256 |\n|---|---|---|---|---|---|---|---|---|---|\n")
    def line(r: dict) -> str:
        if "refused" in r:
            return f"| {r['model']} | {r['candidate']} | refused: {r['refused'].split(';')[0]} | | | | | | | |\n"
        cells = [r["model"], r["candidate"], r["runtime"], f"{r['accuracy']:.4f}", f"{r['acc_delta_pt']:+.1f}",
                 f"{r['bytes']:,}", f"{r['bytes_ratio']:.2f}", f"{r['b1_ms']:.3f}", f"{r['b256_ms']:.3f}",
                 f"{r['speedup_b256']:.2f}"]
        return "| " + " | ".join(cells) + " |\n"

    return head + "".join(line(r) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the training epochs (smoke run)")
    ap.add_argument("--model", action="append", choices=list(MODELS), help="only this model (repeatable)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(epochs_scale=0.25 if args.quick else 1.0, models=args.model)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"threads": THREADS, "torch": torch.__version__, "engine": torch.backends.quantized.engine,
            "seconds": time.perf_counter() - t0}
    (OUT / "quantize.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (OUT / "quantize.md").write_text(to_markdown(rows))
    print(to_markdown(rows))
    print(f"total {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
