"""Pruning benchmark, side by side in one run (writes benchmarks/out/prune.{json,md}).

1. LeNet-300-100 on mnist5k at sparsities 50-98%: accuracy vs artifact bytes, slimfuse (AGP,
   sparse-zstd artifact) vs torch.nn.utils.prune global L1 (one-shot, same layers, same fine-tune
   budget), whose fair size is its dense file compressed with zstd.
2. LeNet-5 at channel ratios 0.25-0.75: accuracy, MACs, measured b1/b256 latency, slimfuse vs plain
   Torch-Pruning BasePruner (one-shot, L1, same fine-tune budget, at fit's default lr and at slimfuse's).
3. Zhu & Gupta's check: the 90%-sparse LeNet-300-100 vs a small dense MLP with as many non-zeros,
   trained for as many epochs as the teacher and its fine-tuning together.

Usage: python benchmarks/prune.py [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.utils.prune as tprune
import torch_pruning as tp
import zstandard

import slimfuse as sf
from slimfuse.measure import counts, measure_one
from slimfuse.models import folder_bytes

SPARSITIES = [0.5, 0.8, 0.9, 0.95, 0.98]
RATIOS = [0.25, 0.5, 0.75]
TEACHER_EPOCHS = {"mlp": 15, "lenet5": 8}
FINETUNE = {"mlp": 4, "lenet5": 3}  # epochs, identical for every method


def zstd_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's dense artifact with every file compressed by zstd (level 19)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = sf.save(model, Path(tmp) / "a", codec="dense")
        return sum(len(zstandard.ZstdCompressor(level=19).compress(f.read_bytes())) for f in path.iterdir())


def artifact_bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return folder_bytes(sf.save(model, Path(tmp) / "a"))


def torch_global_l1(teacher, data, sparsity: float, epochs: int):
    """torch.nn.utils.prune: global L1 over the hidden layers, one-shot, fine-tuned with masks, made permanent."""
    model = copy.deepcopy(teacher)
    params = [(model.fc1, "weight"), (model.fc2, "weight")]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    for module, _ in params:  # the computed weight is not a graph leaf, so fit() could not deepcopy the model;
        module.weight = module.weight.detach()  # the pruning hook recomputes it in every forward pass
    tuned = sf.fit(model, data, epochs=epochs, schedule="cosine", op=None, progress=False)
    for module, name in [(tuned.fc1, "weight"), (tuned.fc2, "weight")]:
        tprune.remove(module, name)
    return tuned


def torch_pruning_plain(teacher, data, ratio: float, epochs: int, lr: float):
    """Plain Torch-Pruning: BasePruner, L1 group importance, one-shot, then the same fine-tuning."""
    model = copy.deepcopy(teacher)
    pruner = tp.pruner.BasePruner(model, data.train.x[:2], importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[model.out])
    pruner.step()
    return sf.fit(model, data, epochs=epochs, lr=lr, schedule="cosine", op=None, progress=False)


def unstructured(data, rows, teacher):
    test = data.test
    dense = {"accuracy": sf.evaluate(teacher, test)["accuracy"], "bytes": artifact_bytes(teacher),
             "zstd_bytes": zstd_bytes(teacher), **counts(teacher)}
    rows.append({"section": "unstructured", "method": "dense", "sparsity": 0.0, **dense})
    e = FINETUNE["mlp"]
    for s in SPARSITIES:
        ours = sf.prune(teacher, sparsity=s, data=data, epochs=e, progress=False)
        theirs = torch_global_l1(teacher, data, s, e)
        for method, m in (("slimfuse agp", ours), ("torch.nn.utils.prune L1", theirs)):
            rows.append({"section": "unstructured", "method": method, "sparsity": s,
                         "accuracy": sf.evaluate(m, test)["accuracy"], "bytes": artifact_bytes(m),
                         "zstd_bytes": zstd_bytes(m), **counts(m)})
        print(f"sparsity {s}: slimfuse {rows[-2]['accuracy']:.4f} / {rows[-2]['bytes']:,} B, "
              f"torch {rows[-1]['accuracy']:.4f} / {rows[-1]['zstd_bytes']:,} B zstd", flush=True)
    return dense


def structured(data, rows, seconds):
    torch.manual_seed(0)
    teacher = sf.fit(sf.zoo.for_task("lenet5", data.task), data, epochs=TEACHER_EPOCHS["lenet5"], progress=False)
    rows.append({"section": "structured", "method": "dense LeNet-5", "channels": 0.0,
                 **measure_one("dense", teacher, data.test, seconds=seconds)})
    e = FINETUNE["lenet5"]
    for r in RATIOS:
        runs = {
            "slimfuse (defaults: l1, 1 step, lr 3e-3)": lambda r=r: sf.prune(teacher, channels=r, data=data,
                                                                             epochs=e, progress=False),
            "Torch-Pruning BasePruner, lr 1e-3": lambda r=r: torch_pruning_plain(teacher, data, r, e, 1e-3),
            "Torch-Pruning BasePruner, lr 3e-3": lambda r=r: torch_pruning_plain(teacher, data, r, e, 3e-3),
        }
        for method, run in runs.items():
            rows.append({"section": "structured", "method": method, "channels": r,
                         **measure_one(method, run(), data.test, seconds=seconds)})
            print(f"channels {r}, {method}: {rows[-1]['accuracy']:.4f} {rows[-1]['throughput_b256']:,.0f}/s",
                  flush=True)


def large_sparse_vs_small_dense(data, rows):
    sparse = next(r for r in rows if r["section"] == "unstructured" and r["method"] == "slimfuse agp"
                  and r["sparsity"] == 0.9)
    budget = sparse["nonzeros"]
    # mlp(784, [h, h // 3], 10): the widest such net with at most as many parameters as the sparse net's non-zeros.
    h = max(h for h in range(3, 300) if counts(sf.zoo.mlp(784, [h, h // 3], 10))["params"] <= budget)
    torch.manual_seed(0)
    small = sf.fit(sf.zoo.mlp(784, [h, h // 3], 10), data, epochs=TEACHER_EPOCHS["mlp"] + FINETUNE["mlp"],
                   progress=False)
    rows.append({"section": "zhu-gupta", "method": f"small dense mlp 784-{h}-{h // 3}-10",
                 "accuracy": sf.evaluate(small, data.test)["accuracy"], "bytes": artifact_bytes(small),
                 "zstd_bytes": zstd_bytes(small), **counts(small)})
    rows.append({**sparse, "section": "zhu-gupta", "method": "large sparse LeNet-300-100 (90%)"})


def table(heading: str, note: str, columns: list[tuple[str, str]], rows: list[dict]) -> list[str]:
    """A Markdown section: ``columns`` are (header, format string over the row's fields)."""
    lines = [f"### {heading}", "", note, "", "| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(f.format(**r) for _, f in columns) + " |" for r in rows] + [""]


def to_markdown(rows, dense_acc) -> str:
    section = {name: [r for r in rows if r["section"] == name] for name in ("unstructured", "structured", "zhu-gupta")}
    for r in section["unstructured"]:
        r["delta_pt"] = 100 * (r["accuracy"] - dense_acc)
    base = section["structured"][0]["throughput_b256"]
    for r in section["structured"]:
        r["speedup"] = r["throughput_b256"] / base
    out = table(
        "Unstructured: LeNet-300-100 on mnist5k",
        f"Fine-tuning: {FINETUNE['mlp']} epochs for both methods (Adam, cosine). Sparsity over fc1+fc2 (the output "
        "layer is excluded for both). Bytes: the artifact as saved; zstd: its dense files compressed with zstd-19.",
        [("sparsity", "{sparsity:.2f}"), ("method", "{method}"), ("accuracy", "{accuracy:.4f}"),
         ("Δ vs dense (pt)", "{delta_pt:+.1f}"), ("non-zeros", "{nonzeros:,}"), ("artifact bytes", "{bytes:,}"),
         ("zstd dense bytes", "{zstd_bytes:,}")],
        section["unstructured"])
    out += table(
        "Structured: LeNet-5 on mnist5k",
        f"Fine-tuning: {FINETUNE['lenet5']} epochs for both methods. Latency: torch eager, 2 threads.",
        [("channels removed", "{channels:.2f}"), ("method", "{method}"), ("accuracy", "{accuracy:.4f}"),
         ("params", "{params:,}"), ("MACs", "{macs:,}"), ("b1 p50 ms", "{latency_b1_p50_ms:.3f}"),
         ("b256 samples/s", "{throughput_b256:,.0f}"), ("b256 speed-up", "{speedup:.2f}x"), ("bytes", "{bytes:,}")],
        section["structured"])
    out += table(
        "Zhu & Gupta: large-sparse vs small-dense at equal non-zeros",
        f"The small dense MLP trains for {TEACHER_EPOCHS['mlp'] + FINETUNE['mlp']} epochs: the teacher's plus the "
        "fine-tuning's.",
        [("model", "{method}"), ("accuracy", "{accuracy:.4f}"), ("non-zeros", "{nonzeros:,}"),
         ("params", "{params:,}"), ("artifact bytes", "{bytes:,}")],
        section["zhu-gupta"])
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    ap.add_argument("--seconds", type=float, default=0.5, help="latency measuring time per model")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(1)  # training: tiny models train faster on one thread; latency is measured on 2
    data = sf.datasets.load("mnist5k")
    torch.manual_seed(0)
    teacher = sf.fit(sf.zoo.for_task("mlp", data.task, hidden=[300, 100]), data, epochs=TEACHER_EPOCHS["mlp"],
                     progress=False)
    rows: list[dict] = []
    dense = unstructured(data, rows, teacher)
    large_sparse_vs_small_dense(data, rows)
    structured(data, rows, args.seconds)
    md = to_markdown(rows, dense["accuracy"])
    md += f"\nTotal time {time.time() - t0:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads.\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune.json").write_text(json.dumps({"rows": rows}, indent=2, default=str))
    (args.out / "prune.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
