"""Hardware benchmark: what this CPU's units buy, measured side by side, hardware named.

1. bf16 / fp16 (``slimfuse.quantize``, computed in half where ``slimfuse.hardware()`` says the CPU
   has the unit) vs fp32, on wide MLPs at batch 256: ratio of medians over interleaved rounds.
2. ``quantize(..., backend="auto")`` on LeNet-300-100 (mnist5k): every backend/format it timed,
   the pick, and the pick vs torch eager fp32 at batch 256, with the accuracy drop.
3. torch CSR sparse matmul vs dense Linear at batch 256: the crossover sparsity per layer size.
4. ``slimfuse.sparse_kernels`` on a 90%-sparse 1024-wide MLP vs its dense self at batch 256.
5. A ResNet-8 (mnist5k) with 50% of its channels pruned (``sf.prune(channels=0.5)``, fine-tuned) vs
   its dense input at batch 256, in torch eager and in ONNX Runtime fp32; accuracy over 3 seeds with
   paired intervals against the dense input and against the dense model trained as long.

    python benchmarks/hardware.py [--rounds 7] [--quick]   # writes benchmarks/out/hardware.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import slimfuse as sf
from slimfuse.hardware import describe, summary
from slimfuse.measure import median_seconds

OUT = Path(__file__).parent / "out"
THREADS = 2


def interleaved(variants: dict, x: torch.Tensor, *, rounds: int, runs: int) -> dict[str, list[float]]:
    """Seconds per call of each variant: one median of ``runs`` calls per round, variants interleaved."""
    times = {n: [] for n in variants}
    with torch.inference_mode():
        for _ in range(rounds):
            for n, fn in variants.items():
                times[n].append(median_seconds(fn, x, runs))
    return times


def ratio_row(name: str, base: list[float], other: list[float]) -> dict:
    """Speed-up of ``other`` over ``base``: ratio of medians, and the spread of per-round ratios."""
    per_round = np.asarray(base) / np.asarray(other)
    return {"case": name, "base_ms": float(np.median(base) * 1e3), "ms": float(np.median(other) * 1e3),
            "speedup": float(np.median(base) / np.median(other)),
            "spread": [float(per_round.min()), float(per_round.max())]}


def half_precision(rounds: int, quick: bool) -> list[dict]:
    rows = []
    widths = [(1024, [1024, 1024]), (4096, [4096, 4096])] if not quick else [(1024, [1024])]
    x_seed = torch.Generator().manual_seed(0)
    for d, hidden in widths:
        torch.manual_seed(0)
        m = sf.zoo.mlp(d, hidden, 10).eval()
        x = torch.randn(256, d, generator=x_seed)
        variants = {"fp32": m}
        for scheme in ("bf16", "fp16"):
            variants[scheme] = sf.quantize(m, scheme)
        times = interleaved(variants, x, rounds=rounds, runs=3 if d >= 4096 else 10)
        with torch.inference_mode():
            ref = m(x)
            for scheme in ("bf16", "fp16"):
                q = variants[scheme]
                row = ratio_row(f"MLP {d}-{'-'.join(map(str, hidden))}-10, {scheme} vs fp32", times["fp32"],
                                times[scheme])
                row["computed_in"] = sf.lineage_of(q)[-1]["params"]["compute"]
                row["max_rel_err"] = float((q(x) - ref).abs().max() / ref.abs().max())
                rows.append(row)
    return rows


def auto_backend(rounds: int, quick: bool) -> dict:
    data = sf.datasets.load("mnist5k")
    torch.manual_seed(0)
    m = sf.fit(sf.zoo.for_task("mlp", data.task, hidden=[300, 100]), data, epochs=5 if quick else 20, progress=False)
    q = sf.quantize(m, "int8-static", calib=data)
    chosen = sf.lineage_of(q)[-1]["params"]["chosen_by"]
    x = data.test.x[:256].contiguous()
    times = interleaved({"fp32": m, "auto": q}, x, rounds=rounds, runs=20)
    row = ratio_row(f"LeNet-300-100 int8-static auto ({chosen['picked']}) vs torch eager fp32", times["fp32"],
                    times["auto"])
    base, acc = sf.evaluate(m, data.test)["accuracy"], sf.evaluate(q, data.test)["accuracy"]
    row.update(fp32_accuracy=base, accuracy=acc, drop_points=(base - acc) * 100)
    return {"chosen_by": chosen, "vs_fp32": row}


def sparse_crossover(rounds: int, quick: bool) -> list[dict]:
    """Dense ``F.linear`` vs torch CSR ``sparse @ dense`` of a magnitude-pruned weight, batch 256."""
    rows = []
    sizes = [256, 1024, 4096] if not quick else [1024]
    import warnings

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    for d in sizes:
        w = torch.randn(d, d)
        x = torch.randn(256, d)
        for s in (0.5, 0.8, 0.9, 0.95, 0.98, 0.99):
            k = int(s * w.numel())
            thr = w.abs().flatten().kthvalue(k).values
            ws = torch.where(w.abs() > thr, w, torch.zeros(()))
            csr = ws.to_sparse_csr()
            xt = x.t().contiguous()
            variants = {"dense": lambda x, ws=ws: torch.nn.functional.linear(x, ws),
                        "csr": lambda x, csr=csr, xt=xt: (csr @ xt).t()}
            times = interleaved(variants, x, rounds=rounds, runs=5 if d >= 4096 else 20)
            row = ratio_row(f"{d}x{d} at {s:.0%} sparse, CSR vs dense", times["dense"], times["csr"])
            row["max_abs_err"] = float(((csr @ xt).t() - torch.nn.functional.linear(x, ws)).abs().max())
            row.update(size=d, sparsity=s)
            rows.append(row)
    return rows


def sparse_mlp(rounds: int, quick: bool) -> dict:
    """A 90%-sparse 1024-wide MLP (magnitude-pruned, random weights) vs its dense self, after sparse_kernels."""
    torch.manual_seed(0)
    d = 1024
    m = sf.zoo.mlp(d, [d, d], 10).eval()
    with torch.no_grad():
        for layer in (m.fc1, m.fc2, m.out):
            w = layer.weight
            w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0
    x = torch.randn(256, d, generator=torch.Generator().manual_seed(0))
    s = sf.sparse_kernels(m, x, batch=256, rounds=rounds)
    times = interleaved({"dense": m, "sparse": s}, x, rounds=rounds, runs=10)
    row = ratio_row("MLP 1024-1024-1024-10 at 90% sparsity, sparse_kernels vs dense", times["dense"], times["sparse"])
    row.update(layers=sf.lineage_of(s)[-1]["params"]["layers"], per_layer=s.slimfuse_kernels)
    return row


def resnet_channels(rounds: int, quick: bool) -> dict:
    """ResNet-8 (widths 16/32/64) trained on mnist5k, 50% of its channels pruned and fine-tuned, against
    its dense input and against the dense model trained as many more epochs (the same budget):
    accuracy with paired intervals, and batch-256 speed in torch eager and ONNX Runtime fp32.
    ``round_to=16`` keeps every width a multiple of 16, the channel block of ONNX Runtime's AVX-512
    convolutions (NCHWc), where an 8-channel layer runs as a padded 16-channel one."""
    from slimfuse.export import to_onnx
    from slimfuse.stats import paired_bootstrap, per_sample, verdict

    data = sf.datasets.load("mnist5k")
    epochs, tune = (2, 1) if quick else (6, 4)
    seeds = [0] if quick else [0, 1, 2]
    correct: dict[str, list[np.ndarray]] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        dense = sf.fit(sf.zoo.for_task("resnet", data.task), data, epochs=epochs, seed=seed, progress=False)
        models = {"dense": dense, "dense, same budget": sf.fit(dense, data, epochs=tune, seed=seed, progress=False)}
        for name, kw in (("pruned 50%", {}), ("pruned 50%, round_to=16", {"round_to": 16})):
            models[name] = sf.prune(dense, channels=0.5, data=data, epochs=tune, seed=seed, progress=False, **kw)
        for n, m in models.items():
            correct.setdefault(n, []).append(per_sample(sf.predict(m, data.test.x), data.test.y)["correct"])
        if seed == seeds[0]:
            timed = models  # speed does not depend on the seed: the first seed's models are timed
    x = data.test.x[:256].contiguous()
    variants = {}
    for name in ("dense", "pruned 50%", "pruned 50%, round_to=16"):
        variants[f"torch {name}"] = timed[name]
        variants[f"onnxruntime {name}"] = to_onnx(timed[name], sample=x[:64])
    times = interleaved(variants, x, rounds=rounds, runs=5)
    pooled = {n: np.concatenate(c) for n, c in correct.items()}  # paired over (seed, test sample)
    rows = []
    for name, m in timed.items():
        accs = [float(c.mean()) for c in correct[name]]
        row = {"model": name, "widths": sf.spec_of(m)["args"]["widths"],
               "params": sum(t.numel() for t in m.parameters()), "accuracy": float(np.mean(accs)),
               "accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, "accuracy_seeds": accs}
        for base in ("dense", "dense, same budget"):
            if name.startswith("pruned"):
                iv = paired_bootstrap(pooled[name], pooled[base])
                # the target, a drop of at most 0.5 pt: met when the whole interval lies above -0.5 pt
                row[f"vs {base}"] = {"points": [100 * iv.diff, 100 * iv.lo, 100 * iv.hi], "verdict": verdict(iv),
                                     "within_half_point": "met" if iv.lo > -0.005 else
                                     "missed" if iv.hi < -0.005 else "tie"}
        if name != "dense, same budget":
            for rt in ("torch", "onnxruntime"):
                row[rt] = ratio_row(f"{name}, {rt}", times[f"{rt} dense"], times[f"{rt} {name}"])
            row["onnxruntime_vs_torch_dense"] = ratio_row(name, times["torch dense"], times[f"onnxruntime {name}"])
        rows.append(row)
    return {"epochs": epochs, "fine_tune_epochs": tune, "seeds": seeds, "rows": rows}


def to_markdown(result: dict) -> str:
    hw = result["hardware"]
    load = ", ".join(f"{v:.1f}" for v in result["load_average"])
    lines = [(f"Hardware: {describe(hw)}; {THREADS} threads (load average at start {load}); batch 256; "
              f"speed-ups are ratios of medians over {result['rounds']} interleaved rounds, "
              "[min, max] of per-round ratios."), ""]
    if "half" in result:
        lines += ["| case | computed in | fp32 ms | ms | speed-up | spread | max rel. error |",
                  "|---|---|---|---|---|---|---|"]
    for r in result.get("half", []):
        lines.append(f"| {r['case']} | {r['computed_in']} | {r['base_ms']:.2f} | {r['ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f} | {r['max_rel_err']:.1e} |")
    if "auto" in result:
        lines += _auto_md(result["auto"])
    if "sparse" in result:
        lines += ["", "| layer | sparsity | dense ms | CSR ms | CSR speed-up | spread |", "|---|---|---|---|---|---|"]
    for r in result.get("sparse", []):
        lines.append(f"| {r['size']}x{r['size']} | {r['sparsity']:.0%} | {r['base_ms']:.3f} | {r['ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['spread'][0]:.2f}-{r['spread'][1]:.2f} |")
    if "sparse_mlp" in result:
        r = result["sparse_mlp"]
        lines += ["", (f"{r['case']}: {r['speedup']:.2f}x [{r['spread'][0]:.2f}-{r['spread'][1]:.2f}] "
                       f"(dense {r['base_ms']:.2f} ms, sparse {r['ms']:.2f} ms; layers run as CSR: "
                       f"{', '.join(r['layers']) or 'none'}); per layer CSR/dense: "
                       + ", ".join(f"{p} {t['speedup']:.2f}x" for p, t in r["per_layer"].items()))]
    if "resnet_channels" in result:
        lines += _resnet_md(result["resnet_channels"])
    return "\n".join(lines) + "\n"


def _resnet_md(r: dict) -> list[str]:
    lines = ["", (f"ResNet-8 on mnist5k, {r['epochs']} epochs, then {r['fine_tune_epochs']} fine-tuning epochs "
                  "(the same-budget dense row: that many more epochs of plain training); seeds "
                  f"{r['seeds']}: accuracy mean ± sd, intervals paired over every (seed, test image). Speed-ups "
                  "at batch 256 (the first seed's models) are against the dense model in the same runtime; the "
                  "last column against torch eager dense."),
             "", "| model | widths | params | test acc | vs dense, pt [95%] | vs same budget, pt [95%] | "
                 "drop <= 0.5 pt | torch ms | torch speed-up | ORT ms | ORT speed-up | ORT vs torch dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        cells = [row["model"], str(row["widths"]), f"{row['params']:,}",
                 f"{row['accuracy']:.4f} ± {row['accuracy_sd']:.4f}"]
        for base in ("dense", "dense, same budget"):
            c = row.get(f"vs {base}")
            cells.append("-" if c is None else "{:+.2f} [{:+.2f}, {:+.2f}] {}".format(*c["points"], c["verdict"]))
        cells.append(row["vs dense, same budget"]["within_half_point"] if "vs dense" in row else "-")
        for rt in ("torch", "onnxruntime"):
            t = row.get(rt)
            cells += ["-", "-"] if t is None else [f"{t['ms']:.2f}",
                                                   f"{t['speedup']:.2f}x ({t['spread'][0]:.2f}-{t['spread'][1]:.2f})"]
        o = row.get("onnxruntime_vs_torch_dense")
        cells.append("-" if o is None else f"{o['speedup']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _auto_md(a: dict) -> list[str]:
    lines = []
    lines += ["", (f"quantize(int8-static, backend=auto) on LeNet-300-100: picked **{a['chosen_by']['picked']}** "
                   f"(threads {a['chosen_by']['threads']})"), "",
              "| candidate | best threads | samples/s | accuracy drop (val) |", "|---|---|---|---|"]
    for n, c in a["chosen_by"]["candidates"].items():
        tp = "failed" if c["throughput"] is None else f"{c['throughput']:,.0f}"
        drop = "n/a" if c["drop"] is None else f"{c['drop'] * 100:+.2f} pt"
        lines.append(f"| {n} | {c['threads']} | {tp} | {drop} |")
    v = a["vs_fp32"]
    lines += ["", (f"Pick vs torch eager fp32 (test set, batch 256): {v['speedup']:.2f}x "
                   f"[{v['spread'][0]:.2f}-{v['spread'][1]:.2f}], accuracy {v['fp32_accuracy']:.4f} -> "
                   f"{v['accuracy']:.4f} ({v['drop_points']:+.2f} pt drop)")]
    return lines


PARTS = {"half": half_precision, "auto": auto_backend, "sparse": sparse_crossover, "sparse_mlp": sparse_mlp,
         "resnet_channels": resnet_channels}


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (ORT follows)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="one size per part, fewer epochs (a smoke run)")
    args = ap.parse_args()
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    t0 = time.time()
    result = {"hardware": summary(), "threads": THREADS, "load_average": list(os.getloadavg()), "rounds": args.rounds}
    for part in args.parts.split(","):
        result[part] = PARTS[part](args.rounds, args.quick)
    result["seconds"] = round(time.time() - t0, 1)
    result["load_average_end"] = list(os.getloadavg())
    OUT.mkdir(parents=True, exist_ok=True)
    stem = "hardware" if args.parts == ",".join(PARTS) else "hardware-" + args.parts.replace(",", "-")
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    (OUT / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
