"""Recommenders: bytes, ranking quality and scoring latency of compressed and ensembled models.

One run, side by side, on ``recsys.synthetic(3000, 2000, interactions=30)`` (leave-one-out; every
test user's held-out item is ranked among all items the user has not seen):

- the reference: matrix factorization, dim 64, softmax loss; the same MF trained with BPR;
- its tables row-wise int8 and int4 (packed, float16 scale/offset per row, dequantized on lookup);
- its dimensions pruned 64 -> 32 and 64 -> 16 (best rank-r approximation of the score matrix by
  SVD, then 3 epochs of fine-tuning), and 64 -> 32 with int4 tables;
- an MF of dim 16 trained alone and distilled from the reference (listwise, teacher's top 50);
- a two-tower model; score-averaging and rank-averaging ensembles of the reference, the BPR MF and
  the two-tower (weights learned on validation NDCG@10);
- a popularity ranking, for context.

Reported: NDCG@10, recall@10, top-10 overlap with the reference, bytes of the embedding tables
(the tensors in the artifact that hold them) and of the whole artifact, batch-1 and batch-256
scoring latency (2 threads). Target: int4 tables >= 7x smaller than fp32 with >= 98% of its NDCG@10.
Writes ``benchmarks/out/recsys.{json,md}``. Run: ``.venv/bin/python benchmarks/recsys.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

import slimfuse as sf
from slimfuse import recsys

OUT = Path(__file__).parent / "out"
TRAIN = {"epochs": 15, "batch_size": 2048}
K = 10


class Popularity(nn.Module):
    def __init__(self, data):
        super().__init__()
        self.register_buffer("counts", torch.bincount(data.train.y, minlength=data.n_items).float())

    def forward(self, users):
        return self.counts.expand(len(users), -1)


def main() -> None:
    t0 = time.time()
    data = recsys.synthetic(3000, 2000, interactions=30, seed=0)
    print(data.describe(), flush=True)
    n, m = data.n_users, data.n_items
    seconds = {}

    def timed(name, fn):
        t = time.time()
        model = fn()
        seconds[name] = round(time.time() - t, 1)
        print(f"  {name}: {seconds[name]}s", flush=True)
        return model

    torch.manual_seed(0)
    mf = timed("mf dim 64 (fp32)", lambda: recsys.fit(recsys.mf(n, m, 64), data, **TRAIN))
    bpr = timed("mf dim 64 (BPR)", lambda: recsys.fit(recsys.mf(n, m, 64), data, loss="bpr", **TRAIN))
    tower = timed("two-tower", lambda: recsys.fit(recsys.two_tower(n, m, 64, [64], 32), data, lr=5e-3, **TRAIN))
    models = {
        "mf dim 64 (fp32)": mf,
        "mf int8 tables": timed("mf int8 tables", lambda: recsys.quantize_tables(mf, 8)),
        "mf int4 tables": timed("mf int4 tables", lambda: recsys.quantize_tables(mf, 4)),
        "mf dims 64->32": timed("mf dims 64->32", lambda: recsys.prune_dims(mf, 0.5, data=data, epochs=3)),
        "mf dims 64->16": timed("mf dims 64->16", lambda: recsys.prune_dims(mf, 0.25, data=data, epochs=3)),
    }
    models["mf dims 64->32 + int4"] = recsys.quantize_tables(models["mf dims 64->32"], 4)
    models["mf dim 16 alone"] = timed("mf dim 16 alone", lambda: recsys.fit(recsys.mf(n, m, 16), data, **TRAIN))
    models["mf dim 16 distilled"] = timed("mf dim 16 distilled",
                                          lambda: recsys.distill(mf, recsys.mf(n, m, 16), data, **TRAIN))
    models["mf dim 64 (BPR)"] = bpr
    models["two-tower"] = tower
    for method in ("score", "rank"):
        models[f"ensemble {method}-avg"] = timed(f"ensemble {method}-avg",
                                                 lambda method=method: recsys.ensemble([mf, bpr, tower], data,
                                                                                       method=method))
    report = sf.measure(models, data.test, score=recsys.score(K, reference=mf), metric=f"ndcg@{K}", seconds=0.5)
    popularity = recsys.evaluate(Popularity(data), data.test)
    rows = []
    for r in report.rows:
        tb = recsys.table_bytes(models[r["name"]])
        rows.append({**r, "table_bytes": tb, "fit_s": seconds.get(r["name"])})
    base = rows[0]
    q4 = next(r for r in rows if r["name"] == "mf int4 tables")
    target = {"int4_table_ratio": base["table_bytes"] / q4["table_bytes"],
              "int4_ndcg_share": q4[f"ndcg@{K}"] / base[f"ndcg@{K}"]}
    target["met"] = target["int4_table_ratio"] >= 7 and target["int4_ndcg_share"] >= 0.98
    weights = {name: [round(float(w), 3) for w in models[name].weights] for name in models if "ensemble" in name}
    OUT.mkdir(exist_ok=True)
    result = {"data": data.describe(), "rows": rows, "popularity": popularity, "target": target,
              "ensemble_weights (mf, bpr, two-tower)": weights, "seconds": round(time.time() - t0, 1)}
    (OUT / "recsys.json").write_text(json.dumps(result, indent=2))
    lines = [f"Data: {data.describe()}. Popularity ranking: NDCG@10 {popularity['ndcg@10']:.4f}, "
             f"recall@10 {popularity['recall@10']:.4f}.", "",
             "| model | NDCG@10 | recall@10 | top-10 overlap | table bytes | x smaller | artifact bytes | "
             "b1 p50 ms | b256 ms | fit s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r[f'ndcg@{K}']:.4f} ({r[f'ndcg@{K}'] / base[f'ndcg@{K}']:.1%}) | "
            f"{r[f'recall@{K}']:.4f} | "
            f"{r[f'overlap@{K}']:.3f} | {r['table_bytes']:,} | {base['table_bytes'] / r['table_bytes']:.2f} | "
            f"{r['bytes']:,} | {r['latency_b1_p50_ms']:.3f} | {r['latency_b256_ms']:.2f} | {r['fit_s'] or ''} |")
    lines += ["", f"Ensemble weights (mf, bpr, two-tower): {weights}",
              f"Target int4: tables {target['int4_table_ratio']:.2f}x smaller (>= 7), "
              f"NDCG@10 {target['int4_ndcg_share']:.1%} of fp32 (>= 98%): {'met' if target['met'] else 'MISSED'}. "
              f"Total {result['seconds']}s."]
    (OUT / "recsys.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
