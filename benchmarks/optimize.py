"""The accuracy-aware search on mnist5k: what ``slimfuse optimize`` finds within half a point.

The input is the demo's teacher (LeNet-300-100, 20 epochs, torch fp32). For each objective
(batch-1 latency, bytes on disk) the search runs with ``max_drop=0.5`` points of validation
accuracy and a 150-second budget; then once allowing no loss at all (``max_drop=0``) within a
10-second budget, to show what the budget cuts. (The "nothing met" path is tested in
``tests/test_search.py``: here channel pruning raises validation accuracy, so even 0 is met.) Reported per run: the
chosen candidate, its test accuracy, its gain over the input on the objective, the Pareto set and the candidates tried.

Writes ``benchmarks/out/optimize.{json,md}``. Run: ``.venv/bin/python benchmarks/optimize.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import slimfuse as sf

OUT = Path(__file__).parent / "out"
RUNS = [("latency", 0.5, 150.0), ("bytes", 0.5, 150.0), ("latency", 0.0, 10.0)]


def _held(h: dict | None) -> str:
    """The choice vs the input model on the test split, and what that says of max_drop."""
    if h is None:
        return "-"
    return f"{h['diff_points']:+.2f} [{h['lo_points']:+.2f}, {h['hi_points']:+.2f}]: {h['verdict']}"


def main() -> dict:
    splits = sf.datasets.load("mnist5k", seed=0)
    torch.manual_seed(0)
    teacher = sf.fit(sf.zoo.for_task("mlp", splits.task, hidden=[300, 100]), splits, epochs=20, seed=0,
                     progress=False)
    results = []
    for objective, max_drop, budget in RUNS:
        t0 = time.perf_counter()
        r = sf.optimize(teacher, splits, objective=objective, max_drop=max_drop, budget_s=budget, seconds=1.0)
        key = r.key
        chosen = r.best or r.closest
        results.append({
            "objective": objective, "max_drop": max_drop, "budget_s": budget,
            "seconds": round(time.perf_counter() - t0, 1), "met": r.met, "message": r.message,
            "chosen": chosen.name, "test_accuracy": chosen.row["accuracy"],
            "input_test_accuracy": r.baseline.row["accuracy"], "val_drop_points": chosen.drop,
            "gain": r.baseline.row[key] / chosen.row[key], "bytes": chosen.row["bytes"],
            "latency_b1_p50_ms": chosen.row["latency_b1_p50_ms"],
            "pareto": [c.name for c in r.pareto], "tried": sum(c.model is not None for c in r.candidates),
            "failed": {c.name: c.error for c in r.candidates if c.error and c.name not in r.skipped},
            "skipped": r.skipped, "held_out": r.held_out,
        })
        print(r.message, flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "optimize.json").write_text(json.dumps({"runs": results}, indent=2) + "\n")
    lines = ["| objective | max drop (pt) | budget s | took s | met | chosen | test acc (input) | val drop pt | "
             "test vs input, pt [95%]: max_drop | gain on objective | bytes | b1 p50 ms | tried | skipped |",
             "|" + "---|" * 14]
    for x in results:
        lines.append(f"| {x['objective']} | {x['max_drop']} | {x['budget_s']:.0f} | {x['seconds']:.0f} | "
                     f"{'yes' if x['met'] else 'NO'} | {x['chosen']} | {x['test_accuracy']:.4f} "
                     f"({x['input_test_accuracy']:.4f}) | {x['val_drop_points']:+.2f} | {_held(x['held_out'])} | "
                     f"{x['gain']:.2f}x | "
                     f"{x['bytes']:,} | {x['latency_b1_p50_ms']:.3f} | {x['tried']} | {len(x['skipped'])} |")
    lines.append("")
    for x in results:
        lines.append(f"- {x['objective']}, {x['max_drop']} pt: Pareto set: {'; '.join(x['pareto'])}")
    (OUT / "optimize.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"runs": results}


if __name__ == "__main__":
    main()
