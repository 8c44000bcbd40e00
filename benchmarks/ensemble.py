"""Ensembles side by side on mnist5k and digits (one run).

Rows: the best of 5 MLP members of different widths/depths, mean / vote / Caruana-weighted /
stacking over the same members, a greedy soup of 5 fine-tunes of one initialization (the middle
width), torchensemble's VotingClassifier (5 MLPs of the middle width: it takes one architecture,
same epochs) and, on digits, scikit-learn's StackingClassifier (5 MLPClassifiers of our widths,
same epochs, logistic-regression meta-learner). Columns: test accuracy,
NLL, training time, batch-1 p50 and batch-256 latency (torch eager, 2 threads).
Plus the vectorized-inference check: 5 members at batch 1 through vmap vs the loop vs one member.

    .venv/bin/python benchmarks/ensemble.py        # -> benchmarks/out/ensemble.{json,md}

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
from pathlib import Path

import numpy as np
import torch
from torch import nn

import slimfuse as sf
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

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.ensemble import StackingClassifier
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
                                ("stacking (blend on val, LR)", "stacking", {"members": list(members)}),
                                (f"stacking ({folds}-fold OOF, LR)", "stacking", {})]:
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
        md += ["", f"Vectorized inference (mean of 5 x MLP{ds['hidden']}): batch 1 p50 one member {v['one_b1_ms']:.3f} ms, "
               f"vmap {v['vmap_b1_ms']:.3f} ms, loop {v['loop_b1_ms']:.3f} ms (vmap/one = "
               f"{v['vmap_over_one_b1']:.2f}x); batch 256 one {v['one_b256_ms']:.2f} ms, vmap "
               f"{v['vmap_b256_ms']:.2f} ms, loop {v['loop_b256_ms']:.2f} ms.", ""]
    md += ["Targets:", ""] + [f"- {t}" for t in result["targets"]]
    return "\n".join(md) + "\n"


def main() -> int:
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
    sys.exit(main())
