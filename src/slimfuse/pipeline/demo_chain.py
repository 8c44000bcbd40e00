"""The demo's chain ensemble -> distill -> prune -> quantize, and its evidence tables.

The chain's aim: one model more accurate than the demo's single teacher, at least 10x smaller
on disk and at least 3x faster (batch-1 latency and batch-256 throughput). Every stage is saved
and reloaded from disk before it is measured. The evidence tables each compare a technique with
the obvious alternative, measured in the same run, and say when the technique did not pay:
staged compression (after Deep Compression's LeNet-300-100 table), large-sparse vs small-dense at
equal non-zeros, ensemble selection vs the best member, greedy vs uniform soup.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import stats
from ..compress.distill import distill, transfer_set
from ..data import Splits
from ..fuse import ensemble, soup
from ..measure import Report, counts
from ..models import load, save, zoo
from ..models.spec import lineage_of
from ..train import evaluate, fit, predict

AIM = {"smaller": 10.0, "faster": 3.0}


def train_members(teacher: nn.Module, splits: Splits, *, seed: int, progress: bool | None) -> list[nn.Module]:
    """Four more LeNet-300-100s, each from its own seed on the training split plus a jittered copy."""
    aug = transfer_set(splits, "augment", copies=1, seed=seed)
    members = []
    for i in range(1, 5):
        torch.manual_seed(seed + i)
        members.append(fit(zoo.for_task("mlp", splits.task, hidden=[300, 100]), splits, epochs=8, lr=2e-3,
                           schedule="cosine", train=aug, seed=seed + i, progress=progress))
    return [teacher, *members]


def chain_step(members: list[nn.Module], splits: Splits, out: Path, *, seed: int,
               progress: bool | None) -> dict[str, nn.Module]:
    """ensemble (Caruana weights) -> distill into 784-128-10 -> remove 25% of its neurons -> int8 in ONNX Runtime."""
    from ..compress.prune import prune
    from ..compress.quantize import quantize

    stages = {}
    stages["chain 1: ensemble of 5 LeNet-300-100 (weighted)"] = ("chain-1-ensemble",
                                                                 ensemble(members, "weighted", splits))
    torch.manual_seed(seed)
    student = distill(stages["chain 1: ensemble of 5 LeNet-300-100 (weighted)"][1],
                      zoo.for_task("mlp", splits.task, hidden=[128]), splits, temperature=4.0, alpha=0.9,
                      epochs=12, transfer="augment", copies=2, mixup=1.0, batch_size=128, lr=2e-3,
                      schedule="cosine", seed=seed, progress=progress)
    stages["chain 2: distilled into 784-128-10"] = ("chain-2-distilled", student)
    pruned = prune(student, channels=0.25, data=splits, epochs=3, seed=seed, progress=progress)
    stages["chain 3: 25% of neurons pruned (784-96-10)"] = ("chain-3-pruned", pruned)
    final = quantize(pruned, "int8-static", calib=splits, backend="onnxruntime", calibrator="percentile")
    stages["chain 4: int8-static (ONNX Runtime)"] = ("chain-4-int8", final)
    for folder, model in stages.values():
        save(model, out / folder, metrics={"test": evaluate(model, splits.test)})
    return {name: load(out / folder) for name, (folder, _) in stages.items()}


def vs(a: nn.Module, b: nn.Module, split, metric: str = "accuracy", *, seed: int = 0) -> tuple[str, stats.Interval]:
    """Does ``a`` beat ``b`` on ``split``? ``("met" | "tie" | "missed", paired 95% interval of a - b)``."""
    pa, pb = (stats.per_sample(predict(m, split).numpy(), split.y.numpy()) for m in (a, b))
    key = "correct" if metric == "accuracy" else "nll"
    interval = stats.paired_bootstrap(pa[key], pb[key], seed=seed)
    return stats.claim(interval, higher_is_better=metric != "nll"), interval


def _claim_of(report: Report, a: str, b: str, metric: str = "accuracy") -> tuple[str, stats.Interval]:
    c = report.compare(a, b, metric)
    return stats.CLAIM[c.verdict], c.interval


def chain_verdict(report: Report, teacher: str, final: str) -> tuple[str, str]:
    t, f = report.row(teacher), report.row(final)
    smaller = t["bytes"] / f["bytes"]
    b1 = t["latency_b1_p50_ms"] / f["latency_b1_p50_ms"]
    b256 = f["throughput_b256"] / t["throughput_b256"]
    acc_claim, acc_iv = _claim_of(report, final, teacher)
    checks = [
        (acc_claim, f"test accuracy {f['accuracy']:.4f} vs the teacher's {t['accuracy']:.4f} "
                    f"(paired difference {100 * acc_iv.diff:+.1f} pt, 95% interval "
                    f"[{100 * acc_iv.lo:+.1f}, {100 * acc_iv.hi:+.1f}])"),
        (smaller >= AIM["smaller"], f"{smaller:.1f}x smaller on disk ({f['bytes']:,} vs {t['bytes']:,} bytes; "
                                    f"aim {AIM['smaller']:.0f}x)"),
        (b1 >= AIM["faster"], f"{b1:.1f}x faster at batch 1 (p50 {f['latency_b1_p50_ms']:.3f} vs "
                              f"{t['latency_b1_p50_ms']:.3f} ms; aim {AIM['faster']:.0f}x)"),
        (b256 >= AIM["faster"], f"{b256:.1f}x the teacher's batch-256 throughput (aim {AIM['faster']:.0f}x)"),
    ]
    lines = [f"- {ok if isinstance(ok, str) else 'met' if ok else 'missed'}: {text}" for ok, text in checks]
    body = (f"Aim: one model more accurate than the single teacher, >= {AIM['smaller']:.0f}x smaller and >= "
            f"{AIM['faster']:.0f}x faster. Final model: '{final}' (ONNX Runtime) vs '{teacher}' (torch eager, "
            f"how it was trained).\n" + "\n".join(lines))
    return "The chain ensemble -> distill -> prune -> quantize", body


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def staged_compression(teacher: nn.Module, pruned: nn.Module, splits: Splits, out: Path, *,
                       seed: int) -> tuple[dict[str, nn.Module], tuple[str, str]]:
    """Dense -> 90% pruned (sparse storage) -> 5-bit shared weights -> entropy coded, as bytes."""
    from ..compress.codebook import payload_bytes
    from ..compress.quantize import quantize
    from ..models import folder_bytes

    shared = quantize(pruned, "codebook:5", data=splits, epochs=1, seed=seed)
    save(shared, out / "pruned-90-codebook5", metrics={"test": evaluate(shared, splits.test)})
    dense = folder_bytes(out / "teacher")
    stages = [
        ("dense fp32", teacher, dense),
        ("pruned 90% (bitmask + values, zstd)", pruned, folder_bytes(out / "pruned-90")),
        ("+ 5-bit shared weights, packed (no entropy coding)", shared,
         folder_bytes(out / "pruned-90-codebook5") - payload_bytes(shared) + payload_bytes(shared, entropy=False)),
        ("+ entropy coding (zstd): the artifact", shared, folder_bytes(out / "pruned-90-codebook5")),
    ]
    acc = {name: evaluate(m, splits.test)["accuracy"] for name, m, _ in stages}
    rows = [[name, f"{acc[name]:.4f}", f"{counts(m)['nonzeros']:,}", f"{b:,}", f"{dense / b:.1f}x"]
            for name, m, b in stages]
    final = dense / stages[-1][2]
    loss = 100 * (acc[stages[-1][0]] - acc["dense fp32"])
    body = (_table(["stage", "test accuracy", "non-zeros", "bytes on disk", "smaller than dense"], rows) +
            f"\n\nDeep Compression reports 40x for LeNet-300-100 (92% pruned, 6-bit, Huffman) at no accuracy "
            f"loss; here {final:.1f}x ({'met' if final >= 40 else 'missed'}) at {loss:+.1f} pt test accuracy. "
            f"Every size is a measured file, the artifact's card and headers included; the packed stage is "
            f"the artifact with its payload written without zstd.")
    return ({"pruned 90% + codebook:5": load(out / "pruned-90-codebook5")},
            ("Staged compression (prune -> quantize -> entropy)", body))


def sparse_vs_dense(pruned: nn.Module, splits: Splits, *, seed: int,
                    progress: bool | None) -> tuple[dict[str, nn.Module], tuple[str, str]]:
    """A dense 784-h-h/3-10 MLP with as many parameters as the pruned model's non-zeros, trained as long."""
    target = counts(pruned)["nonzeros"]
    h = 1
    while _mlp_params(h + 1) <= target:
        h += 1
    torch.manual_seed(seed)
    small = fit(zoo.for_task("mlp", splits.task, hidden=[h, max(1, h // 3)]), splits, epochs=24, seed=seed,
                progress=progress)
    a_sparse, a_dense = evaluate(pruned, splits.test)["accuracy"], evaluate(small, splits.test)["accuracy"]
    name = f"small dense 784-{h}-{max(1, h // 3)}-10"
    rows = [["large-sparse: LeNet-300-100, 90% pruned", f"{target:,}", f"{a_sparse:.4f}"],
            [f"small-dense: {name[12:]}", f"{counts(small)['params']:,}", f"{a_dense:.4f}"]]
    c, iv = vs(pruned, small, splits.test, seed=seed)
    verdict = (f"large-sparse beats small-dense (as Zhu & Gupta (2017) found): {c} (paired accuracy difference "
               f"{100 * iv.diff:+.1f} pt, 95% interval [{100 * iv.lo:+.1f}, {100 * iv.hi:+.1f}])")
    body = (_table(["model", "non-zero parameters", "test accuracy"], rows) +
            f"\n\nSame training budget (20 + 4 fine-tuning epochs vs 24 epochs): {verdict}.")
    return {name: small}, ("Large-sparse vs small-dense at equal non-zeros", body)


def _mlp_params(h: int) -> int:
    h2 = max(1, h // 3)
    return 784 * h + h + h * h2 + h2 + h2 * 10 + 10


def ensemble_evidence(members: list[nn.Module], splits: Splits, *, seed: int) -> tuple[dict, tuple[str, str]]:
    """Caruana-weighted and stacked ensembles vs their best member and the plain mean."""
    variants = {
        "best member (by val accuracy)": max(members, key=lambda m: evaluate(m, splits.val)["accuracy"]),
        "ensemble mean (5 LeNet-300-100)": ensemble(members, "mean", splits),
        "ensemble weighted (Caruana)": ensemble(members, "weighted", splits),
        "ensemble stacking (linear meta-learner)": ensemble(members, "stacking", splits, seed=seed),
    }
    scores = {n: (evaluate(m, splits.val), evaluate(m, splits.test)) for n, m in variants.items()}
    best_name = "best member (by val accuracy)"
    claims = {}
    for n in variants:
        if n != best_name:
            claims[n] = {k: vs(variants[n], variants[best_name], splits.test, k, seed=seed)
                         for k in ("accuracy", "nll")}

    def cell(n, k):
        if n not in claims:
            return "—"
        c, iv = claims[n][k]
        scale = 100 if k == "accuracy" else 1
        return (f"{c}: {scale * iv.diff:+.{1 if k == 'accuracy' else 4}f} "
                f"[{scale * iv.lo:+.{1 if k == 'accuracy' else 4}f}, {scale * iv.hi:+.{1 if k == 'accuracy' else 4}f}]")

    rows = [[n, f"{v['accuracy']:.4f}", f"{t['accuracy']:.4f}", f"{t['nll']:.4f}", cell(n, "accuracy"), cell(n, "nll")]
            for n, (v, t) in scores.items()]
    acc_c, nll_c = claims["ensemble weighted (Caruana)"]["accuracy"][0], claims["ensemble weighted (Caruana)"]["nll"][0]
    verdict = (f"ensemble selection vs the best member on the test split: accuracy {acc_c}, NLL {nll_c} "
               "(\"met\" only when the paired 95% interval lies wholly on the side of a gain, "
               "\"tie\" when it contains 0)")
    weights = ", ".join(f"{w:.2f}" for w in variants["ensemble weighted (Caruana)"].selection.weights)
    body = (_table(["model", "val accuracy", "test accuracy", "test NLL", "accuracy vs best member (pt)",
                    "NLL vs best member (lower is better)"], rows) +
            f"\n\nMembers: the teacher and four LeNet-300-100s trained from other seeds on jittered data; "
            f"Caruana weights {weights} (chosen on the validation split). {verdict}. Stacking's validation "
            f"accuracy is in-sample: its meta-learner is fit on the validation split (the members never saw it).")
    return ({n: variants[n] for n in ("best member (by val accuracy)", "ensemble weighted (Caruana)",
                                      "ensemble stacking (linear meta-learner)")},
            ("Ensemble selection vs best member", body))


def soup_evidence(teacher: nn.Module, splits: Splits, *, seed: int,
                  progress: bool | None) -> tuple[dict, tuple[str, str]]:
    """Four fine-tunes of the teacher (seeds, learning rates, jitter), averaged uniformly and greedily."""
    aug = transfer_set(splits, "augment", copies=1, seed=seed)
    ingredients = []
    for i, lr in enumerate((3e-4, 5e-4, 1e-3, 2e-3), 1):
        torch.manual_seed(seed + 10 + i)
        ingredients.append(fit(teacher, splits, epochs=1, lr=lr, train=aug, seed=seed + 10 + i, progress=progress))
    variants = {
        "best fine-tune (by val accuracy)": max(ingredients, key=lambda m: evaluate(m, splits.val)["accuracy"]),
        "uniform soup (4 fine-tunes)": soup(ingredients, "uniform", splits),
        "greedy soup": soup(ingredients, "greedy", splits),
    }
    scores = {n: (evaluate(m, splits.val), evaluate(m, splits.test)) for n, m in variants.items()}
    rows = [[n, f"{v['accuracy']:.4f}", f"{t['accuracy']:.4f}"] for n, (v, t) in scores.items()]
    kept = lineage_of(variants["greedy soup"])[-1]["params"]["kept"]
    c, iv = vs(variants["greedy soup"], variants["uniform soup (4 fine-tunes)"], splits.test, seed=seed)
    verdict = (f"greedy beats uniform: {c} (paired accuracy difference {100 * iv.diff:+.1f} pt, 95% interval "
               f"[{100 * iv.lo:+.1f}, {100 * iv.hi:+.1f}])")
    body = (_table(["model", "val accuracy", "test accuracy"], rows) +
            f"\n\nAll four start from the teacher's weights (1 epoch each, learning rates 3e-4 to 2e-3, "
            f"jittered data). Greedy kept ingredients {kept}: {verdict} on the test split.")
    return {"greedy soup (teacher fine-tunes)": variants["greedy soup"]}, ("Greedy vs uniform soup", body)
