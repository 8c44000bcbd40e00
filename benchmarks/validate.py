"""What the validation gate costs: ``slimfuse.validate.check`` next to the step it guards.

For each step (on mnist5k: LeNet-300-100 pruned one-shot, int8-static in ONNX Runtime and in
torch, a 3-member weighted ensemble; LeNet-5 int8-static in torch), the step is timed with
``validate=False`` and the gate alone (``check`` on the step's result, as the step calls it),
interleaved, ``REPEATS`` times; medians and spread (min-max) are reported, with the gate's share
of the step. Two threads. Writes ``benchmarks/out/validate.{json,md}``.
Run: ``.venv/bin/python benchmarks/validate.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

import slimfuse as sf
from slimfuse.hardware import describe
from slimfuse.validate import check

OUT = Path(__file__).parent / "out"
REPEATS = 5


def isa() -> str:
    """The machine, in words (slimfuse.hardware: CPU, cores, ISA features, torch's kernels)."""
    return describe()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    torch.set_num_threads(2)
    data = sf.datasets.load("mnist5k")
    torch.manual_seed(0)
    mlp = sf.fit(sf.zoo.for_task("mlp", data.task, hidden=[300, 100]), data, epochs=5, progress=False)
    lenet = sf.fit(sf.zoo.for_task("lenet5", data.task), data, epochs=2, progress=False)
    members = [mlp, sf.prune(mlp, sparsity=0.5, schedule="oneshot", validate=False),
               sf.quantize(mlp, "int8-dynamic", backend="torch", validate=False)]
    steps = {
        "prune 0.9 oneshot (MLP)": (lambda v: sf.prune(mlp, sparsity=0.9, schedule="oneshot", data=data,
                                                       epochs=0, validate=v), mlp),
        "int8-static ORT (MLP)": (lambda v: sf.quantize(mlp, "int8-static", calib=data, validate=v), mlp),
        "int8-static torch (MLP)": (lambda v: sf.quantize(mlp, "int8-static", calib=data, backend="torch",
                                                          validate=v), mlp),
        "int8-static torch (LeNet-5)": (lambda v: sf.quantize(lenet, "int8-static", calib=data, backend="torch",
                                                              validate=v), lenet),
        "ensemble weighted (3 members)": (lambda v: sf.ensemble(members, "weighted", data, validate=v), members),
    }
    rows = []
    for name, (step, ref) in steps.items():
        t_step, t_gate = [], []
        for _ in range(REPEATS):
            dt, result = timed(lambda step=step: step(False))
            t_step.append(dt)
            dt, _ = timed(lambda result=result, ref=ref, name=name: check(result, name, reference=ref, data=data))
            t_gate.append(dt)
        med_s, med_g = statistics.median(t_step), statistics.median(t_gate)
        rows.append({"step": name, "step_s": round(med_s, 4), "step_spread": [round(min(t_step), 4),
                     round(max(t_step), 4)], "gate_s": round(med_g, 4),
                     "gate_spread": [round(min(t_gate), 4), round(max(t_gate), 4)],
                     "gate_share": round(med_g / (med_s + med_g), 3)})
        print(rows[-1], flush=True)
    OUT.mkdir(exist_ok=True)
    meta = {"hardware": isa(), "threads": 2, "repeats": REPEATS, "samples": 256}
    (OUT / "validate.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Hardware: {meta['hardware']}; 2 threads; median of {REPEATS} (min-max); loaded machine.", "",
             "| step | step alone (s) | gate (s) | gate share of step + gate |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['step_s']:.3f} ({r['step_spread'][0]:.3f}-{r['step_spread'][1]:.3f}) | "
                     f"{r['gate_s']:.3f} ({r['gate_spread'][0]:.3f}-{r['gate_spread'][1]:.3f}) | "
                     f"{100 * r['gate_share']:.0f}% |")
    (OUT / "validate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
