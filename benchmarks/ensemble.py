"""Ensembles side by side on mnist5k and digits (one run).

Rows: the best of 5 MLP members of different widths/depths, mean / vote / Caruana-weighted /
stacking over the same members, a greedy soup of 5 fine-tunes of one initialization (the middle
width), torchensemble's VotingClassifier (5 MLPs of the middle width: it takes one architecture,
same epochs) and, on digits, scikit-learn's StackingClassifier (5 MLPClassifiers of our widths,
same epochs, logistic-regression meta-learner). Columns: test accuracy,
NLL, training time, batch-1 p50 and batch-256 latency (torch eager, 2 threads).
Plus the vectorized-inference check: 5 members at batch 1 through vmap vs the loop vs one member.

    .venv/bin/python benchmarks/ensemble.py              # seeds 0-2, paired intervals, fused latency
                                                         # -> benchmarks/out/ensemble-seeds.{json,md}
    .venv/bin/python benchmarks/ensemble.py --seed 1     # one seed's members (parallel runs); the
                                                         # plain command reuses out/ensemble-seed*.npz
    .venv/bin/python benchmarks/ensemble.py --baselines  # one seed, outside baselines -> out/ensemble.{json,md}

Over seeds: per data set and seed, 5 MLP members of different widths; the best member (by
validation NLL), mean, plain Caruana and the default weighted ensemble, each selected on the
validation rows alone and on them plus the members' 3-fold out-of-fold rows, and stacking (a log-linear
pool blended on the validation split; a logistic regression and the log-linear pool, the default, on the
3-fold out-of-fold rows plus the members' validation rows, applied to the refitted members; the pool on
the out-of-fold rows applied to the fold models as a bag) on the test split;
mean and spread over seeds and the paired 95% bootstrap interval over the pooled test samples of
all seeds (plus each seed's own verdict). Then 5 members of one architecture fused vs one member vs
the loop in torch eager, and fused vs one member in ONNX Runtime, interleaved in short blocks of calls, medians.

torchensemble is optional (``make bench-deps`` installs it with --no-deps); its row is skipped
when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import slimfuse as sf
from slimfuse import stats
from slimfuse.fuse import ensemble, soup, train_members
from slimfuse.measure import latency

OUT = Path(__file__).parent / "out"
K = 5
CONFIG = {  # data set -> (hidden widths of the 5 MLP members, epochs, stacking folds)
    "mnist5k": ([[32], [64], [128], [256], [128, 64]], 8, 3),
    "digits": ([[16], [32], [64], [128], [64, 32]], 20, 3),
}
TIMING_SECONDS = 0.5


def metrics(proba: torch.Tensor, y: torch.Tensor) -> dict:
    proba = proba.double().clamp_min(1e-12)
    return {"accuracy": float((proba.argmax(1) == y).double().mean()),
            "nll": float(-proba[torch.arange(len(y)), y].log().mean())}


def timing(model: nn.Module, x: torch.Tensor) -> dict:
    lat = latency(model, x, threads=2, seconds=TIMING_SECONDS)
    return {"b1_p50_ms": lat["latency_b1_p50_ms"], "b256_ms": lat["latency_b256_ms"]}


class ProbaModule(nn.Module):
    """Wraps a scikit-learn classifier (numpy in, probabilities out) so it is timed like the rest."""

    def __init__(self, est):
        super().__init__()
        self.est = est

    def forward(self, x):
        return torch.from_numpy(self.est.predict_proba(x.reshape(len(x), -1).numpy()))


def row(name, model, data, train_s, *, proba_out=False, note=""):
    x = data.test.x
    with torch.inference_mode():
        proba = model(x) if proba_out else sf.predict(model, data.test, output="proba")
    r = {"name": name, **metrics(proba, data.test.y), "train_s": train_s, **timing(model, x), "note": note}
    print(f"  {name:<42} acc {r['accuracy']:.4f} nll {r['nll']:.4f} train {train_s:6.1f}s "
          f"b1 {r['b1_p50_ms']:.3f}ms b256 {r['b256_ms']:.2f}ms", flush=True)
    return r


def torchensemble_row(data, hidden, epochs, seed):
    try:
        from torchensemble import VotingClassifier
    except ImportError:
        return None
    from torch.utils.data import DataLoader, TensorDataset

    task = data.task

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = sf.zoo.for_task("mlp", task, hidden=hidden)

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(data.train.x, data.train.y), batch_size=64, shuffle=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # its logger writes ./logs/
        model = VotingClassifier(estimator=MLP, n_estimators=K, cuda=False)
        model.set_optimizer("Adam", lr=1e-3)
        start = time.perf_counter()
        logging.disable(logging.INFO)  # it logs every epoch of every estimator
        try:
            model.fit(loader, epochs=epochs, log_interval=10**9, save_model=False)
        finally:
            logging.disable(logging.NOTSET)
        train_s = time.perf_counter() - start
    model.eval()
    return row("torchensemble VotingClassifier (5 MLPs)", model, data, train_s, proba_out=True,
               note="loop over members")


def sklearn_stacking_row(data, widths, epochs, seed):
    import warnings

    from sklearn.ensemble import StackingClassifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    x = data.train.x.reshape(len(data.train), -1).numpy()
    est = StackingClassifier(
        [(f"mlp{i}", MLPClassifier(tuple(h), max_iter=epochs, batch_size=64, random_state=seed + i))
         for i, h in enumerate(widths)],
        final_estimator=LogisticRegression(max_iter=2000), cv=CONFIG["digits"][2], stack_method="predict_proba",
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(x, data.train.y.numpy())
    train_s = time.perf_counter() - start
    return row("scikit-learn StackingClassifier (5 MLPs)", ProbaModule(est), data, train_s, proba_out=True,
               note=f"{CONFIG['digits'][2]}-fold, LR meta")


def vectorized_check(data, hidden) -> dict:
    """Timing only: 5 members of one architecture (untrained weights time the same)."""
    members = [sf.zoo.for_task("mlp", data.task, hidden=hidden) for _ in range(K)]
    ens = ensemble(members, "mean", data)
    one = timing(members[0], data.test.x)
    ens.vectorize = True
    vm = timing(ens, data.test.x)
    assert ens.last_path == "vmap"
    ens.vectorize = False
    loop = timing(ens, data.test.x)
    out = {"one_b1_ms": one["b1_p50_ms"], "vmap_b1_ms": vm["b1_p50_ms"], "loop_b1_ms": loop["b1_p50_ms"],
           "one_b256_ms": one["b256_ms"], "vmap_b256_ms": vm["b256_ms"], "loop_b256_ms": loop["b256_ms"]}
    out["vmap_over_one_b1"] = out["vmap_b1_ms"] / out["one_b1_ms"]
    print(f"  vectorized: one {out['one_b1_ms']:.3f} ms, vmap {out['vmap_b1_ms']:.3f} ms, loop "
          f"{out['loop_b1_ms']:.3f} ms at b1 (vmap/one = {out['vmap_over_one_b1']:.2f}); b256 one "
          f"{out['one_b256_ms']:.2f} vmap {out['vmap_b256_ms']:.2f} loop {out['loop_b256_ms']:.2f} ms", flush=True)
    return out


def run_dataset(name: str, seed: int = 0) -> dict:
    widths, epochs, folds = CONFIG[name]
    hidden = widths[K // 2]  # one architecture for the soup, torchensemble and the vmap check
    data = sf.datasets.load(name, seed=seed)
    print(f"{name}: MLPs {widths}, {epochs} epochs, train {len(data.train)} / val {len(data.val)} / "
          f"test {len(data.test)}", flush=True)
    builders = [lambda h=h: sf.zoo.for_task("mlp", data.task, hidden=h) for h in widths]
    members = train_members(builders, data, K, "architectures", epochs=epochs, folds=folds, seed=seed)
    t_members, t_folds = members.seconds["members"], members.seconds["folds"]
    rows = []
    val_acc = [sf.evaluate(m, data.val)["accuracy"] for m in members]
    best = members[int(np.argmax(val_acc))]
    rows.append(row("best member (by val accuracy)", best, data, t_members / K))
    for label, method, opts in [("mean of probabilities", "mean", {}), ("majority vote", "vote", {}),
                                ("weighted (Caruana)", "weighted", {}),
                                ("weighted (Caruana + NLL refine)", "weighted", {"refine": True}),
                                ("stacking (blend on val)", "stacking", {"members": list(members)}),
                                (f"stacking ({folds}-fold OOF + val rows)", "stacking", {})]:
        group = opts.pop("members", members)
        start = time.perf_counter()
        ens = ensemble(group, method, data, seed=seed, **opts)
        fit_s = time.perf_counter() - start
        extra = t_folds if (method == "stacking" and group is members) else 0.0
        note = ""
        if method == "weighted":
            note = "weights " + "/".join(f"{w:.2f}" for w in ens.selection.weights)
        rows.append(row(label, ens, data, t_members + extra + fit_s, note=note))
    # greedy soup: 5 fine-tunes of one initialization (half the epochs each, after half the epochs of a base)
    start = time.perf_counter()
    base = sf.fit(builders[K // 2](), data, epochs=epochs // 2, seed=seed, progress=False)
    tuned = [sf.fit(base, data, epochs=epochs - epochs // 2, seed=seed + 1 + i, progress=False) for i in range(K)]
    soup_model = soup(tuned, "greedy", data)
    kept = sf.lineage_of(soup_model)[-1]["params"]["kept"]
    rows.append(row("greedy soup (5 fine-tunes of one init)", soup_model, data, time.perf_counter() - start,
                    note=f"kept {len(kept)} of {K}"))
    te = torchensemble_row(data, hidden, epochs, seed)
    if te is not None:
        rows.append(te)
    if name == "digits":
        rows.append(sklearn_stacking_row(data, widths, epochs, seed))
    return {"dataset": name, "widths": widths, "hidden": hidden, "epochs": epochs, "folds": folds, "rows": rows,
            "vectorized": vectorized_check(data, hidden)}


def targets(result: dict) -> list[str]:
    out = []
    for ds in result["datasets"]:
        r = {x["name"]: x for x in ds["rows"]}
        best, mean = r["best member (by val accuracy)"], r["mean of probabilities"]
        for name in [n for n in r if n.startswith(("weighted (Caruana)", "stacking ("))]:
            for metric, better in (("accuracy", max), ("nll", min)):
                ok = all(better(r[name][metric], o[metric]) == r[name][metric] and r[name][metric] != o[metric]
                         for o in (best, mean))
                out.append(f"{ds['dataset']}: {name} beats best member and mean on test {metric}: "
                           f"{'met' if ok else 'MISSED'} ({r[name][metric]:.4f} vs {best[metric]:.4f} / "
                           f"{mean[metric]:.4f})")
        v = ds["vectorized"]["vmap_over_one_b1"]
        out.append(f"{ds['dataset']}: 5 members via vmap at batch 1 <= 2x one member: "
                   f"{'met' if v <= 2 else 'MISSED'} ({v:.2f}x)")
    return out


def to_markdown(result: dict) -> str:
    md = []
    for ds in result["datasets"]:
        md += [f"### {ds['dataset']} (members: MLPs {ds['widths']}, {ds['epochs']} epochs)", "",
               "| model | accuracy | NLL | train s | b1 p50 ms | b256 ms | note |", "|---|---|---|---|---|---|---|"]
        for r in ds["rows"]:
            md.append(f"| {r['name']} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['train_s']:.1f} | "
                      f"{r['b1_p50_ms']:.3f} | {r['b256_ms']:.2f} | {r['note']} |")
        v = ds["vectorized"]
        md += ["", f"Vectorized inference (mean of 5 x MLP{ds['hidden']}): "
               f"batch 1 p50 one member {v['one_b1_ms']:.3f} ms, "
               f"vmap {v['vmap_b1_ms']:.3f} ms, loop {v['loop_b1_ms']:.3f} ms (vmap/one = "
               f"{v['vmap_over_one_b1']:.2f}x); batch 256 one {v['one_b256_ms']:.2f} ms, vmap "
               f"{v['vmap_b256_ms']:.2f} ms, loop {v['loop_b256_ms']:.2f} ms.", ""]
    md += ["Targets:", ""] + [f"- {t}" for t in result["targets"]]
    return "\n".join(md) + "\n"


# ---- over seeds, with paired intervals (issue 17) -------------------------------------------------

SEEDS = (0, 1, 2)
DEFAULT_WEIGHTED = "weighted (default: val + OOF rows, bagged + prior + temperature, checked)"
VARIANTS = [  # label, method, options; "plain_list": the members as a plain list, without their out-of-fold set
    ("mean of probabilities", "mean", {}),
    ("weighted (plain Caruana on val)", "weighted",
     {"bags": 0, "refine": False, "temperature": False, "fallback": False, "plain_list": True}),
    ("weighted (val only, bagged + prior + temperature, checked: the previous default)", "weighted",
     {"plain_list": True}),
    ("weighted (plain Caruana on val + OOF rows)", "weighted",
     {"bags": 0, "refine": False, "temperature": False, "fallback": False}),
    ("weighted (val + OOF rows, bagged + prior + temperature, unchecked)", "weighted", {"fallback": False}),
    (DEFAULT_WEIGHTED, "weighted", {}),
    ("stacking (blend on val, log-linear pool)", "stacking", {"plain_list": True}),
    ("stacking (3-fold OOF + val rows, LR: the previous default's meta-learner)", "stacking", {"meta": "linear"}),
    ("stacking (3-fold OOF + val rows, log-linear pool, refitted members: default)", "stacking", {}),
    ("stacking (3-fold OOF, log-linear pool, fold bag)", "stacking", {"bag": True}),
]


def per_sample(model, split) -> dict:
    logits = sf.predict(model, split).numpy()
    return stats.per_sample(logits, split.y.numpy())


def seeded(name: str, seed: int) -> dict:
    widths, epochs, folds = CONFIG[name]
    data = sf.datasets.load(name, seed=seed)
    builders = [lambda h=h: sf.zoo.for_task("mlp", data.task, hidden=h) for h in widths]
    members = train_members(builders, data, K, "architectures", epochs=epochs, folds=folds, seed=seed)
    best = min(members, key=lambda m: sf.evaluate(m, data.val)["nll"])
    out = {"best member (by val NLL)": per_sample(best, data.test)}
    notes = {}
    for label, method, opts in VARIANTS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opts = dict(opts)
            # a plain list has no out-of-fold set: stacking then blends on the validation split, weighted
            # selects on it alone
            ens = ensemble(list(members) if opts.pop("plain_list", False) else members, method, data, seed=seed,
                           **opts)
        out[label] = per_sample(ens, data.test)
        if method == "weighted":
            notes[label] = {"weights": [round(float(w), 3) for w in ens.selection.weights],
                            "temperature": round(ens.temperature, 3), "fallback": bool(caught)}
    print(f"  {name} seed {seed}: " + ", ".join(f"{k[:18]} {v['correct'].mean():.4f}/{v['nll'].mean():.4f}"
                                             for k, v in out.items()), flush=True)
    return {"samples": out, "notes": notes}


def compare_over_seeds(runs: list[dict], a: str, b: str, key: str) -> dict:
    """Per-seed paired intervals, and one over the pooled test samples of every seed."""
    per = [stats.paired_bootstrap(r["samples"][a][key], r["samples"][b][key], seed=i) for i, r in enumerate(runs)]
    pooled = stats.paired_bootstrap(np.concatenate([r["samples"][a][key] for r in runs]),
                                    np.concatenate([r["samples"][b][key] for r in runs]))
    higher = key == "correct"
    return {"pooled": pooled.to_dict(), "claim": stats.claim(pooled, higher_is_better=higher),
            "per_seed": [stats.claim(iv, higher_is_better=higher) for iv in per]}


def calls_per_batch(x) -> int:
    return 2000 if len(x) == 1 else 200


BLOCK = 50  # consecutive calls of one variant at batch 1 (10 at batch 256) before the next takes its turn


def fused_latency() -> list[dict]:
    """5 members of one MLP architecture: one member vs fused vs the loop in torch eager, and one member vs
    the fused ensemble in ONNX Runtime (slimfuse's predictor, and its bare session), 2 threads,
    interleaved in short blocks of calls within each pass (torch; each ONNX Runtime session); medians
    (and 10th percentiles) of the per-call times."""
    from slimfuse.export import to_onnx

    rows = []
    for label, in_f, hidden in (("LeNet-300-100 (mnist5k)", 784, [300, 100]), ("784-128-10", 784, [128]),
                                ("64-32-10 (digits)", 64, [32])):
        torch.manual_seed(0)
        members = [sf.zoo.mlp(in_f, hidden, 10) for _ in range(K)]
        ens = ensemble(members, "mean")
        x = torch.randn(256, in_f)
        ort_one, ort_fused = to_onnx(members[0], sample=x), to_onnx(ens, sample=x)
        sessions = {"session_one": ort_one.session(2), "session_fused": ort_fused.session(2)}
        models = {"one": members[0], "fused": ens, "loop": ens, "ort_one": ort_one, "ort_fused": ort_fused}
        times = {v: [] for v in (*models, *sessions)}
        old = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            # torch, and each ONNX Runtime session, in a pass of its own: a session's worker threads spin
            # after a call, which slowed the other runtime's or session's calls 2-6x when all were interleaved
            groups = (("one", "fused", "loop"), ("ort_one", "session_one"), ("ort_fused", "session_fused"))
            # within a group the variants take turns in blocks of BLOCK consecutive calls, each call timed:
            # short enough that load changes hit them alike, long enough that each runs with its own
            # weights in cache, as a served model does (call by call, the variants evicted one another's
            # weights: five 784-128-10 members fused are 2 MB, this CPU's L2)
            with torch.inference_mode():
                for xb, group in ((xb, g) for xb in (x[:1], x) for g in groups):
                    calls = {v: [] for v in group}
                    feed = {sessions["session_one"].get_inputs()[0].name: xb.numpy()}
                    block = BLOCK if len(xb) == 1 else BLOCK // 5
                    for turn in range(calls_per_batch(xb) // block + 1):
                        for variant in group:
                            ens.fuse = variant != "loop"
                            for _ in range(block):
                                if variant in sessions:
                                    t0 = time.perf_counter()
                                    sessions[variant].run(None, feed)
                                else:
                                    t0 = time.perf_counter()
                                    models[variant](xb)
                                if turn:  # the first turn warms up
                                    calls[variant].append(time.perf_counter() - t0)
                            if variant in ("fused", "loop"):
                                assert ens.last_path == variant, ens.last_path
                    for v, ts in calls.items():
                        times[v].append(np.asarray(ts) * 1e3)
        finally:
            torch.set_num_threads(old)
        ens.fuse = True
        row = {"model": label, "calls": [len(t) for t in times["one"]]}
        for variant, (b1, b256) in times.items():
            row[f"{variant}_b1_ms"], row[f"{variant}_b256_ms"] = float(np.median(b1)), float(np.median(b256))
            row[f"{variant}_b1_iqr"] = float(np.subtract(*np.percentile(b1, [75, 25])))
            row[f"{variant}_b1_min"], row[f"{variant}_b256_min"] = (float(np.percentile(b1, 10)),
                                                                    float(np.percentile(b256, 10)))
        for b in ("b1", "b256"):
            for fused, one in (("fused", "one"), ("ort_fused", "ort_one"), ("session_fused", "session_one")):
                row[f"{fused}_over_one_{b}_min"] = row[f"{fused}_{b}_min"] / row[f"{one}_{b}_min"]
                row[f"{fused}_over_one_{b}"] = row[f"{fused}_{b}_ms"] / row[f"{one}_{b}_ms"]
            row[f"loop_over_one_{b}"] = row[f"loop_{b}_ms"] / row[f"one_{b}_ms"]
        print(f"  fused {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("model", "calls")),
              flush=True)
        print(f"    medians of {row['calls']} calls in interleaved blocks; 10th percentiles fused/one b1 "
              f"{row['fused_over_one_b1_min']:.2f}x b256 {row['fused_over_one_b256_min']:.2f}x", flush=True)
        rows.append(row)
    return rows


def onnx_members_latency() -> list[dict]:
    """Three ONNX Runtime members of different MLP architectures: one member alone, the ensemble (one
    ONNX graph holding the members and the combiner, one session), and its member loop (``fuse=False``)
    without spinning threads (the loop's default) and with ONNX Runtime's default, spinning; 2 threads,
    blocks of calls as in :func:`fused_latency`."""
    import slimfuse.runtime
    from slimfuse.export import to_onnx
    from slimfuse.fuse.combine import Ensemble

    torch.manual_seed(0)
    torch_members = [sf.zoo.mlp(784, h, 10) for h in ([128], [256], [128, 64])]
    x = torch.randn(256, 784)
    members = [to_onnx(m, sample=x) for m in torch_members]
    ens = Ensemble(members, "mean", classes=10).eval()
    loop = Ensemble(members, "mean", classes=10).eval()
    loop.fuse = False

    def spinning(xb):
        with slimfuse.runtime.spinning(True):  # ONNX Runtime's default, as before 2026-12-03
            return loop(xb)

    variants = {"one": lambda xb: members[0](xb), "graph": ens, "loop": loop, "spinning": spinning}
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    row: dict = {"model": "784-128-10, 784-256-10, 784-128-64-10 (ONNX Runtime)"}
    try:
        with torch.inference_mode():
            for xb in (x[:1], x):
                b = f"b{len(xb)}"
                torch.testing.assert_close(ens(xb), loop(xb), rtol=1e-5, atol=1e-5)
                assert ens.last_path == "fused" and loop.last_path == "loop"
                calls = {v: [] for v in variants}
                block = BLOCK if len(xb) == 1 else BLOCK // 5
                for turn in range(calls_per_batch(xb) // block + 1):
                    for name, fn in variants.items():
                        for _ in range(block):
                            t0 = time.perf_counter()
                            fn(xb)
                            if turn:
                                calls[name].append(time.perf_counter() - t0)
                for name, ts in calls.items():
                    row[f"{name}_{b}_ms"] = float(np.median(ts) * 1e3)
                    row[f"{name}_{b}_p10"] = float(np.percentile(ts, 10) * 1e3)
                row[f"graph_over_one_{b}"] = row[f"graph_{b}_ms"] / row[f"one_{b}_ms"]
                row[f"spinning_over_loop_{b}"] = row[f"spinning_{b}_ms"] / row[f"loop_{b}_ms"]
    finally:
        torch.set_num_threads(old)
    print("  onnx members: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "model"), flush=True)
    return [row]


def cpu_features() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return torch.backends.cpu.get_cpu_capability()
    names = {"avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16",
             "avx512_fp16": "AVX512-FP16"}
    return ", ".join(v for k, v in names.items() if k in flags) or torch.backends.cpu.get_cpu_capability()


def seeds_markdown(result: dict) -> str:
    md = [f"CPU: {result['cpu']}; torch {result['torch']}; 2 threads; seeds {list(SEEDS)}.", ""]
    for ds in result["datasets"]:
        md += [f"### {ds['dataset']} (members: MLPs {ds['widths']}, {ds['epochs']} epochs; {ds['n_test']} test "
               f"samples per seed)", "",
               "| model | test accuracy mean ± sd | test NLL mean ± sd | NLL vs best member (pooled 95% CI; per seed) "
               "| NLL vs mean | accuracy vs best member (pt) |", "|---|---|---|---|---|---|"]
        for name, r in ds["rows"].items():
            def c(key, r=r):
                if key not in r:
                    return "—"
                v = r[key]
                s = 100 if key.startswith("acc") else 1
                iv = v["pooled"]
                return (f"{v['claim']}: {s * iv['diff']:+.4f} [{s * iv['lo']:+.4f}, {s * iv['hi']:+.4f}]; "
                        f"{'/'.join(v['per_seed'])}")
            md.append(f"| {name} | {r['accuracy']['mean']:.4f} ± {r['accuracy']['std']:.4f} | "
                      f"{r['nll']['mean']:.4f} ± {r['nll']['std']:.4f} | {c('nll_vs_best')} | {c('nll_vs_mean')} | "
                      f"{c('acc_vs_best')} |")
        md += ["", "Weighted (default) per seed: " + "; ".join(
            f"weights {n['weights']}, T={n['temperature']}, fallback {n['fallback']}" for n in ds["notes"]), ""]
    md += ["### Fused members (5 x one MLP architecture, mean)", "",
           "| members | one b1 ms | fused b1 ms | loop b1 ms | fused/one b1 | loop/one b1 | one b256 ms | "
           "fused b256 ms | loop b256 ms | fused/one b256 | fused/one b1, b256 (10th percentiles) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["fused"]:
        md.append(f"| {r['model']} | {r['one_b1_ms']:.3f} | {r['fused_b1_ms']:.3f} | {r['loop_b1_ms']:.3f} | "
                  f"{r['fused_over_one_b1']:.2f}x | {r['loop_over_one_b1']:.2f}x | {r['one_b256_ms']:.2f} | "
                  f"{r['fused_b256_ms']:.2f} | {r['loop_b256_ms']:.2f} | {r['fused_over_one_b256']:.2f}x | "
                  f"{r['fused_over_one_b1_min']:.2f}x, {r['fused_over_one_b256_min']:.2f}x |")
    md += ["", "The same members in ONNX Runtime (`slimfuse.export.to_onnx`: the predictor users call, and its bare "
           "session without the torch <-> numpy wrapping):", "",
           "| members | one b1 ms | fused b1 ms | fused/one b1 | session one b1 ms | session fused b1 ms | "
           "session fused/one b1 | one b256 ms | fused b256 ms | fused/one b256 | session fused/one b256 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["fused"]:
        if "ort_one_b1_ms" not in r:
            continue
        md.append(f"| {r['model']} | {r['ort_one_b1_ms']:.3f} | {r['ort_fused_b1_ms']:.3f} | "
                  f"{r['ort_fused_over_one_b1']:.2f}x | {r['session_one_b1_ms']:.3f} | "
                  f"{r['session_fused_b1_ms']:.3f} | {r['session_fused_over_one_b1']:.2f}x | "
                  f"{r['ort_one_b256_ms']:.2f} | {r['ort_fused_b256_ms']:.2f} | "
                  f"{r['ort_fused_over_one_b256']:.2f}x | {r['session_fused_over_one_b256']:.2f}x |")
    md += ["", "ONNX Runtime members of different architectures (medians; 10th percentiles in brackets):", "",
           "| members | batch | one ms | ensemble, one graph ms | graph / one | member loop ms | "
           "member loop, spinning ms | spinning / loop |", "|---|---|---|---|---|---|---|---|"]
    for r in result.get("onnx_members", []):
        for b in ("b1", "b256"):
            cells = " | ".join(f"{r[f'{v}_{b}_ms']:.3f} ({r[f'{v}_{b}_p10']:.3f})" for v in ("one", "graph"))
            md.append(f"| {r['model']} | {b[1:]} | {cells} | {r[f'graph_over_one_{b}']:.2f}x | "
                      f"{r[f'loop_{b}_ms']:.3f} ({r[f'loop_{b}_p10']:.3f}) | "
                      f"{r[f'spinning_{b}_ms']:.3f} ({r[f'spinning_{b}_p10']:.3f}) | "
                      f"{r[f'spinning_over_loop_{b}']:.2f}x |")
    md += ["", "Targets:", ""] + [f"- {t}" for t in result["targets"]]
    return "\n".join(md) + "\n"


def seeds_targets(result: dict) -> list[str]:
    out = []
    for ds in result["datasets"]:
        for name, r in ds["rows"].items():
            if not name.startswith(("weighted (default", "weighted (val", "stacking")):
                continue
            nll_ok = r["nll_vs_best"]["claim"] == "met" and r["nll_vs_mean"]["claim"] == "met"
            acc_ok = r["acc_vs_best"]["claim"] != "missed"
            out.append(f"{ds['dataset']}: {name} beats best member and mean on test NLL: "
                       f"{'met' if nll_ok else 'missed'} (vs best {r['nll_vs_best']['claim']}, vs mean "
                       f"{r['nll_vs_mean']['claim']})")
            out.append(f"{ds['dataset']}: {name} not worse than best member on accuracy beyond noise: "
                       f"{'met' if acc_ok else 'missed'} ({r['acc_vs_best']['claim']})")
    for r in result["fused"]:
        for key, runtime in (("fused", "torch eager"), ("ort_fused", "ONNX Runtime predictor"),
                             ("session_fused", "ONNX Runtime session")):
            if f"{key}_over_one_b1" not in r:
                continue
            for b, limit in (("b1", 2), ("b256", 5)):
                ratio = r[f"{key}_over_one_{b}"]
                out.append(f"5 fused {r['model']} in {runtime} at batch {b[1:]} <= {limit}x one member: "
                           f"{'met' if ratio <= limit else 'missed'} ({ratio:.2f}x)")
    return out


def run_seed(seed: int) -> None:
    """Both data sets for one seed -> out/ensemble-seed{seed}.npz + .json (the aggregate reads them)."""
    arrays, notes = {}, {}
    for name in CONFIG:
        run = seeded(name, seed)
        for label, v in run["samples"].items():
            for key, arr in v.items():
                arrays[f"{name}|{label}|{key}"] = arr
        notes[name] = run["notes"]
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(OUT / f"ensemble-seed{seed}.npz", **arrays)
    (OUT / f"ensemble-seed{seed}.json").write_text(json.dumps(notes, indent=2))


def load_seed(seed: int) -> dict:
    z = np.load(OUT / f"ensemble-seed{seed}.npz", allow_pickle=False)
    notes = json.loads((OUT / f"ensemble-seed{seed}.json").read_text())
    out: dict = {}
    for k in z.files:
        name, label, key = k.split("|")
        out.setdefault(name, {"samples": {}, "notes": notes[name]})["samples"].setdefault(label, {})[key] = z[k]
    return out


def main_seeds(seeds=SEEDS) -> int:
    start = time.perf_counter()
    missing = [s for s in seeds if not (OUT / f"ensemble-seed{s}.npz").exists()]
    for s in missing:
        run_seed(s)
    loaded = [load_seed(s) for s in seeds]
    datasets = []
    for name in CONFIG:
        widths, epochs, _ = CONFIG[name]
        runs = [ld[name] for ld in loaded]
        rows = {}
        for label in runs[0]["samples"]:
            row = {"accuracy": stats.spread([r["samples"][label]["correct"].mean() for r in runs]),
                   "nll": stats.spread([r["samples"][label]["nll"].mean() for r in runs])}
            if label != "best member (by val NLL)":
                row["nll_vs_best"] = compare_over_seeds(runs, label, "best member (by val NLL)", "nll")
                row["acc_vs_best"] = compare_over_seeds(runs, label, "best member (by val NLL)", "correct")
                if label != "mean of probabilities":
                    row["nll_vs_mean"] = compare_over_seeds(runs, label, "mean of probabilities", "nll")
            rows[label] = row
        datasets.append({"dataset": name, "widths": widths, "epochs": epochs, "rows": rows,
                         "n_test": len(runs[0]["samples"][label]["nll"]),
                         "notes": [r["notes"][DEFAULT_WEIGHTED] for r in runs]})
    result = {"datasets": datasets, "fused": fused_latency(), "onnx_members": onnx_members_latency(),
              "torch": torch.__version__, "cpu": cpu_features()}
    result["targets"] = seeds_targets(result)
    result["seconds"] = time.perf_counter() - start
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ensemble-seeds.json").write_text(json.dumps(result, indent=2))
    md = seeds_markdown(result)
    (OUT / "ensemble-seeds.md").write_text(md)
    print(md)
    print(f"total {result['seconds']:.0f} s")
    return 0


def main() -> int:
    """The single-seed comparison with outside baselines (``--baselines``)."""
    start = time.perf_counter()
    result = {"datasets": [run_dataset(name) for name in CONFIG], "torch": torch.__version__,
              "threads": 2, "cpu_count": os.cpu_count()}
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - start
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ensemble.json").write_text(json.dumps(result, indent=2))
    md = to_markdown(result)
    (OUT / "ensemble.md").write_text(md)
    print(md)
    print(f"total {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    if "--baselines" in sys.argv[1:]:
        sys.exit(main())
    if "--seed" in sys.argv[1:]:  # one seed's members only (run seeds in parallel, then aggregate)
        run_seed(int(sys.argv[sys.argv.index("--seed") + 1]))
        sys.exit(0)
    sys.exit(main_seeds())
