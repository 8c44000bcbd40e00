"""The ensemble jobs behind the CLI: train members into one artifact, combine artifacts."""

from __future__ import annotations

from pathlib import Path

from ..data import Splits
from ..errors import ConfigError
from ..models import load, save, zoo
from ..train import evaluate
from .api import ensemble
from .members import DIVERSITY, train_members

STACKING_FOLDS = 5


def train_ensemble(model: str, data: Splits, kwargs: dict, k: int, diversity: str, method: str, *,
                   seed: int = 0, **fit_options):
    """Train ``k`` zoo members (``model`` may list several architectures, comma-separated) and combine them."""
    if diversity not in DIVERSITY:
        raise ConfigError(f"unknown --diversity {diversity!r}; choose one of: {', '.join(DIVERSITY)}")
    archs = [a.strip() for a in model.split(",") if a.strip()]
    if len(archs) > 1 and diversity != "architectures":
        raise ConfigError("several models given; use --diversity architectures")
    builders = [
        (lambda a=a: zoo.for_task(a, data.task, **(kwargs if len(archs) == 1 else {}))) for a in archs
    ]
    if diversity == "architectures":
        builders = [builders[i % len(builders)] for i in range(k)]
    members = train_members(builders if diversity == "architectures" else builders[0], data, k, diversity,
                            folds=STACKING_FOLDS if method == "stacking" else None, seed=seed, **fit_options)
    return ensemble(members, method, data, seed=seed)


def ensemble_artifacts(paths: list[Path], data: Splits, out: Path, *, method: str, trust_factory: bool = False,
                       **options) -> str:
    """Load member artifacts, combine them with ``method`` on ``data``, save to ``out``; returns a summary."""
    if not paths:
        raise ConfigError("name at least one member artifact")
    members = [load(p, trust_factory=trust_factory) for p in paths]
    ens = ensemble(members, method, data, **options)
    rows = {p.name: evaluate(m, data.test) for p, m in zip(paths, members)}
    metrics = {"val": evaluate(ens, data.val), "test": evaluate(ens, data.test),
               "members_test": rows}
    save(ens, out, metrics=metrics)
    lines = [f"{name}: test accuracy {r['accuracy']:.4f}, NLL {r['nll']:.4f}" for name, r in rows.items()]
    if method == "weighted":
        w = ens.selection.weights
        lines.append("weights: " + ", ".join(f"{p.name}={v:.3f}" for p, v in zip(paths, w)))
    t = metrics["test"]
    lines.append(f"saved {out} ({method} of {len(paths)}): test accuracy {t['accuracy']:.4f}, NLL {t['nll']:.4f}")
    return "\n".join(lines)
