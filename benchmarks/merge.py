"""Weight-space merges side by side on mnist5k (one run, 3 seeds).

Part 1, independently trained models: per seed, 5 LeNet-300-100 MLPs (k = 2, 3, 5), 3 LeNet-5s
and 3 ResNet-8s (residual, BatchNorm; k = 2, 3) are trained from different initializations and
data orders (short schedules: 6, 4 and 4 epochs, to keep the run to minutes on a shared
machine); for k of them: the best member (chosen on validation), the mean ensemble, the naive
weight average (uniform soup), the aligned average (weight matching), aligned + REPAIR,
activation matching + REPAIR, and ``merge``'s default (weight or activation matching, with or
without REPAIR, whichever is most accurate on the validation split).
Part 2, fine-tunes of one base: an MLP trained briefly on all classes is fine-tuned on three
class subsets ({0-3}, {3-6}, {6-9}); its fine-tunes are merged by the uniform soup, task
arithmetic, TIES, DARE and DARE-TIES (coefficients chosen on validation).
Every row: test accuracy and NLL, median and range over seeds; the difference to the best member
with its paired bootstrap interval (median over seeds), and the batch-1 latency of the k-member
mean ensemble over the merged model's (median over seeds of the ratio `merge` measures in its
verification: interleaved rounds of both on the machine named in the header). Merges run with
``validate=False``: the benchmark reports collapsed averages that ``merge``'s gate would refuse.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/merge.py     # -> benchmarks/out/merge.{json,md}
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import slimfuse as sf
from slimfuse.data import Split, Splits
from slimfuse.hardware import describe

OUT = Path(__file__).parent / "out"
SEEDS = (0, 1, 2)
KS = (2, 3, 5)
ARCHS = {  # name -> (builder, epochs, batch size, learning rate, members per seed: k up to this)
    # short training keeps the run to minutes on a shared 2-core machine
    "mlp-300-100": (lambda task: sf.zoo.for_task("mlp", task, hidden=[300, 100]), 6, 256, 2e-3, 5),
    "lenet5": (lambda task: sf.zoo.for_task("lenet5", task), 4, 256, 3e-3, 3),
    "resnet-8": (lambda task: sf.zoo.for_task("resnet", task), 4, 128, 3e-3, 3),
}
INDEPENDENT = {  # row -> merge options
    "naive average": {"method": "uniform"},
    "aligned (weights)": {"method": "rebasin", "matching": "weights", "repair": False},
    "aligned + REPAIR": {"method": "rebasin", "matching": "weights", "repair": True},
    "aligned (activations) + REPAIR": {"method": "rebasin", "matching": "activations", "repair": True},
    "default (matching and REPAIR chosen on validation)": {"method": "rebasin"},
}
SUBSETS = ((0, 1, 2, 3), (3, 4, 5, 6), (6, 7, 8, 9))
FINETUNED = {
    "uniform soup": {"method": "uniform"},
    "task arithmetic": {"method": "task-arithmetic"},
    "TIES": {"method": "ties"},
    "DARE": {"method": "dare"},
    "DARE-TIES": {"method": "dare-ties"},
}


def hardware() -> str:
    """The machine, in words (slimfuse.hardware: CPU, cores, ISA features, torch's kernels)."""
    return describe() + f"; {torch.get_num_threads()} threads"


def train(arch: str, data: Splits, seed: int, train_split: Split | None = None, base=None, epochs=None):
    build, default_epochs, batch, lr, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = base if base is not None else build(data.task)
    return sf.fit(model, data, epochs=epochs or default_epochs, batch_size=batch, lr=lr, seed=seed,
                  train=train_split, progress=False)


def row_of(model) -> dict:
    v = model.verification
    return {"accuracy": v["merged"]["accuracy"], "nll": v["merged"]["nll"],
            "vs_best": v["vs_best"]["accuracy"], "verdict": v["verdict"],
            "best": v["best_member"], "ensemble": v["ensemble"], "speedup": v["latency"]["speedup"]}


def merged_rows(members, data, options: dict, base=None) -> dict:
    out = {}
    for name, opts in options.items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = sf.merge(members, data=data, base=base if opts["method"] != "uniform" else None, validate=False,
                              **opts)  # the raw merges, collapsed ones included
        out[name] = {**row_of(merged), "merge_s": round(time.perf_counter() - t0, 2)}
    any_row = next(iter(out.values()))
    out = {"best member": {**any_row["best"]}, "ensemble (mean)": {**any_row["ensemble"]}, **out}
    return out


def summarise(runs: list[dict]) -> list[dict]:
    """runs: one {row: result} per seed -> per row median and range of accuracy / NLL over seeds."""
    table = []
    for name in runs[0]:
        acc = np.array([r[name]["accuracy"] for r in runs])
        nll = np.array([r[name]["nll"] for r in runs])
        best = np.array([r["best member"]["accuracy"] for r in runs])
        row = {"row": name, "acc_median": float(np.median(acc)), "acc_min": float(acc.min()),
               "acc_max": float(acc.max()), "nll_median": float(np.median(nll)),
               "drop_vs_best_points": float(np.median((best - acc) * 100))}
        if "vs_best" in runs[0][name]:
            row["vs_best_low"] = float(np.median([r[name]["vs_best"]["lo"] for r in runs]))
            row["vs_best_high"] = float(np.median([r[name]["vs_best"]["hi"] for r in runs]))
            row["verdicts"] = [r[name]["verdict"] for r in runs]
        if "speedup" in runs[0][name]:
            row["ensemble_over_merged_latency"] = float(np.median([r[name]["speedup"] for r in runs]))
        table.append(row)
    return table


def markdown(title: str, table: list[dict]) -> str:
    lines = [f"#### {title}", "",
             ("| row | test acc (median) | range over seeds | NLL (median) | drop vs best member (points) "
              "| 95% interval vs best (median) | verdicts | ensemble / merged latency, batch 1 |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        ci = (f"[{r['vs_best_low'] * 100:+.1f}, {r['vs_best_high'] * 100:+.1f}]" if "vs_best_low" in r else "")
        lines.append(f"| {r['row']} | {r['acc_median']:.4f} | {r['acc_min']:.4f}-{r['acc_max']:.4f} | "
                     f"{r['nll_median']:.4f} | {r['drop_vs_best_points']:+.1f} | {ci} | "
                     f"{', '.join(r.get('verdicts', []))} | "
                     + (f"{r['ensemble_over_merged_latency']:.2f}x |" if "ensemble_over_merged_latency" in r else " |"))
    return "\n".join(lines) + "\n"


def independent(arch: str, data: Splits, result: dict, md: list) -> None:
    kmax = ARCHS[arch][4]
    ks = [k for k in KS if k <= kmax]
    runs = {k: [] for k in ks}
    for seed in SEEDS:
        t0 = time.perf_counter()
        members = [train(arch, data, 1000 * seed + i) for i in range(kmax)]
        print(f"{arch} seed {seed}: trained {len(members)} members in {time.perf_counter() - t0:.0f}s", flush=True)
        for k in ks:
            rows = merged_rows(members[:k], data, INDEPENDENT)
            runs[k].append(rows)
            print(f"  k={k}: " + "; ".join(f"{n} {r['accuracy']:.3f}" for n, r in rows.items()), flush=True)
    for k in ks:
        table = summarise(runs[k])
        result["independent"][f"{arch} k={k}"] = {"table": table, "runs": runs[k]}
        md.append(markdown(f"{k} independently trained {arch} on mnist5k", table))


def finetuned(data: Splits, result: dict, md: list) -> None:
    fine_runs = []
    for seed in SEEDS:
        t0 = time.perf_counter()
        base = train("mlp-300-100", data, 1000 * seed + 500, epochs=2)
        tunes = []
        for j, classes in enumerate(SUBSETS):
            keep = torch.isin(data.train.y, torch.tensor(classes))
            tunes.append(train("mlp-300-100", data, 1000 * seed + 600 + j, train_split=data.train.subset(
                torch.nonzero(keep).flatten()), base=base, epochs=3))
        rows = merged_rows(tunes, data, FINETUNED, base=base)
        base_acc = sf.evaluate(base, data.test)
        rows = {"base": {"accuracy": base_acc["accuracy"], "nll": base_acc["nll"]}, **rows}
        fine_runs.append(rows)
        print(f"fine-tunes seed {seed} ({time.perf_counter() - t0:.0f}s): "
              + "; ".join(f"{n} {r['accuracy']:.3f}" for n, r in rows.items()), flush=True)
    table = summarise(fine_runs)
    result["finetuned"] = {"table": table, "runs": fine_runs}
    md.append(markdown("3 fine-tunes of one MLP base on class subsets {0-3}, {3-6}, {6-9} (mnist5k)", table))


def write(result: dict, md: list, start: float) -> None:
    result["seconds"] = round(time.perf_counter() - start, 1)
    OUT.mkdir(exist_ok=True)
    (OUT / "merge.json").write_text(json.dumps(result, indent=2))
    (OUT / "merge.md").write_text("\n".join(md + [f"Total {result['seconds']} s wall.\n"]))


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    data = sf.datasets.load("mnist5k")
    result = {"hardware": hardware(), "seeds": list(SEEDS), "independent": {}, "finetuned": {}}
    md = [f"Hardware: {result['hardware']}. Seeds {list(SEEDS)}.\n"]
    for part in (lambda: independent("mlp-300-100", data, result, md), lambda: finetuned(data, result, md),
                 lambda: independent("lenet5", data, result, md), lambda: independent("resnet-8", data, result, md)):
        part()
        write(result, md, start)  # results so far survive an interrupted run
    print("\n".join(md + [f"Total {result['seconds']} s wall.\n"]))


if __name__ == "__main__":
    sys.exit(main())
