"""The demo's ensemble step: four quick MLPs plus the demo's teacher, combined two ways.

The teacher and four small MLPs (different seeds, a few epochs) are combined by
Caruana-weighted averaging and by stacking on the validation split; the weighted
ensemble is saved as one artifact and reloaded from disk before it is measured.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..data import Splits
from ..fuse import ensemble, train_members
from ..models import load, save, zoo
from ..train import evaluate


def ensemble_step(teacher: nn.Module, splits: Splits, out: Path, *, seed: int = 0) -> dict[str, nn.Module]:
    """Rows for the demo report: the best member, the weighted and the stacked ensemble."""
    small = train_members(lambda: zoo.for_task("mlp", splits.task, hidden=[64]), splits, 4, "seed",
                          epochs=5, lr=2e-3, seed=seed)
    members = [teacher, *small]
    weighted = ensemble(members, "weighted", splits)
    stacked = ensemble(members, "stacking", splits, seed=seed)
    save(weighted, out / "ensemble", metrics={"val": evaluate(weighted, splits.val),
                                              "test": evaluate(weighted, splits.test)})
    best = max(members, key=lambda m: evaluate(m, splits.val)["accuracy"])
    share = ", ".join(f"{w:.2f}" for w in weighted.selection.weights)
    return {
        "best member (by val accuracy)": best,
        f"ensemble weighted (teacher + 4 MLP-64; weights {share})": load(out / "ensemble"),
        "ensemble stacking (teacher + 4 MLP-64)": stacked,
    }
