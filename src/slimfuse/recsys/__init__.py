"""Recommendation: implicit-feedback data, recommenders, ranking metrics, table compression, ensembles.

```python
from slimfuse import recsys
data = recsys.synthetic(seed=0)                      # or recsys.read_interactions("ratings.csv")
mf = recsys.fit(recsys.mf(data.n_users, data.n_items, 64), data, loss="bpr")
q4 = recsys.quantize_tables(mf, 4)                   # packed int4 rows, dequantized on lookup
sf.measure({"mf": mf, "int4": q4}, data.test, score=recsys.score(10, reference=mf), metric="ndcg@10")
```
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..devices import cpu_only
from ..errors import ConfigError
from ..models import zoo
from ..models.spec import spec_of
from ..search import Move, register_task
from .compress import QEmbedding, QTables, distill, prune_dims, quantize_tables, table_bytes
from .data import HeldOut, Interactions, leave_one_out, read_interactions, synthetic
from .ensemble import RecEnsemble, ensemble
from .metrics import evaluate, ndcg_at, recall_at, score, topk_overlap
from .models import MF, TwoTower, bpr_loss, fit, mf, two_tower

METRIC = "ndcg@10"  # the metric optimize_space's candidates are judged by (with score(10))


def optimize_space(model: nn.Module, data: Interactions, *, seed: int = 0,
                   epochs: int = 5) -> list[tuple[str, Callable[[nn.Module], nn.Module]]]:
    """Named candidate transforms of a float recommender for an accuracy-aware search.

    int8 / int4 tables, half and quarter the embedding dimensions (fine-tuned ``epochs``), those
    with int4 tables, and a matrix-factorization student at a quarter of the width distilled from
    the model (plain and int8). Judge them with ``score(10)`` and metric ``"ndcg@10"``.
    """
    spec = spec_of(model) or {}
    if spec.get("arch") not in ("mf", "two-tower"):
        what = spec.get("arch") or type(model).__name__
        raise ConfigError(f"optimize_space takes an mf or two-tower model, not {what}")
    dim = spec["args"]["dim"]
    tune = {"data": data, "epochs": epochs, "seed": seed}

    def pruned(frac):
        return lambda m: prune_dims(m, frac, **tune)

    def student(m):
        small = zoo.build({"arch": "mf", "args": {"n_users": data.n_users, "n_items": data.n_items,
                                                  "dim": max(1, dim // 4)}})
        return distill(m, small, data, epochs=2 * epochs, seed=seed)

    return [
        ("int8", lambda m: quantize_tables(m, 8)),
        ("int4", lambda m: quantize_tables(m, 4)),
        ("dims/2", pruned(0.5)),
        ("dims/4", pruned(0.25)),
        ("dims/2+int4", lambda m: quantize_tables(pruned(0.5)(m), 4)),
        ("dims/4+int8", lambda m: quantize_tables(pruned(0.25)(m), 8)),
        ("distilled mf dim/4", student),
        ("distilled mf dim/4+int8", lambda m: quantize_tables(student(m), 8)),
    ]


@register_task("recommendation")
def search_space(model: nn.Module, data: Interactions, objective: str, device: str = "cpu"):
    """``slimfuse.optimize``'s space for recommenders: int8/int4 tables as finishing moves (bytes only:
    dequantizing on lookup costs latency), dimension pruning and a distilled student as structural
    moves (the search applies the finishing moves to those itself), judged on NDCG@10. Its training
    runs on the CPU: another ``device`` is refused."""
    cpu_only(device, "the recommender search space")
    moves = []
    for name, fn in optimize_space(model, data):
        if "+" in name:  # combinations: the search composes structural and finishing moves itself
            continue
        if name.startswith("int"):
            moves.append(Move(name, fn, finishing=True, objectives=("bytes",)))
        else:  # structural: rebuilt per seed (the ensemble level trains copies from other seeds)
            moves.append(Move(name, lambda m, seed, name=name: dict(optimize_space(m, data, seed=seed))[name](m)))
    return moves, score(10), METRIC


__all__ = [
    "METRIC",
    "MF",
    "HeldOut",
    "Interactions",
    "QEmbedding",
    "QTables",
    "RecEnsemble",
    "TwoTower",
    "bpr_loss",
    "distill",
    "ensemble",
    "evaluate",
    "fit",
    "leave_one_out",
    "mf",
    "ndcg_at",
    "optimize_space",
    "prune_dims",
    "quantize_tables",
    "read_interactions",
    "recall_at",
    "score",
    "search_space",
    "synthetic",
    "table_bytes",
    "topk_overlap",
    "two_tower",
]
