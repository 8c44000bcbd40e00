"""Train ensemble members: ``train_members(builder_or_builders, data, k, diversity)``.

Diversity comes from different seeds (init and shuffling), bootstrap samples
(``bagging``), snapshots of one run with a cyclic learning rate (``snapshot``:
cosine annealing with warm restarts, a member saved at the end of each cycle),
or different architectures (``architectures``: one builder per member).

With ``folds=k`` every member is also trained k times on k-1 folds of the
training split, and the fold models' predictions on their held-out fold become
the out-of-fold meta-features that stacking needs (``members.oof``).

With ``checkpoint=FOLDER`` every member's training is checkpointed each epoch; a rerun
with the same arguments keeps the finished members, resumes the interrupted one from its
last epoch and trains the rest, reaching the same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import KFold, StratifiedKFold
from torch import nn

from .. import distributed
from ..checkpoint import Area, Resume, fingerprint
from ..data import Splits
from ..errors import ConfigError
from ..models.keras import torch_of
from ..models.spec import derive
from ..train import fit
from .stacking import OutOfFold

DIVERSITY = ("seed", "bagging", "snapshot", "architectures")


class Members(list):
    """A list of trained members; ``trained_on[i]`` are the training-split rows member i saw,
    ``oof`` the out-of-fold meta-training set (with ``folds``), else ``None``; ``fold_models[f]``
    the members trained without fold ``f`` (what produced ``oof``; stacking applies its
    meta-learner to them as a bag); ``seconds`` the wall-clock training time of the members and
    of the fold models."""

    def __init__(self, models, trained_on, oof: OutOfFold | None = None, diversity: str = "seed",
                 seconds: dict | None = None, fold_models: list[list[nn.Module]] | None = None):
        super().__init__(models)
        self.trained_on = trained_on
        self.oof = oof
        self.fold_models = fold_models
        self.diversity = diversity
        self.seconds = seconds or {}


def train_members(
    builder: nn.Module | Callable[[], nn.Module] | list,
    data: Splits,
    k: int | None = None,
    diversity: str = "seed",
    *,
    epochs: int = 10,
    folds: int | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    **fit_options,
) -> Members:
    """Train ``k`` members on ``data.train``.

    ``builder``: a module to re-initialize per member, a zero-argument callable returning a
    fresh module, or (``architectures``) a list of those, one per member. ``epochs``: per
    member; for ``snapshot`` the length of the one run, split into ``k`` cosine cycles.
    ``fit_options`` go to :func:`slimfuse.fit` (``lr``, ``batch_size``, ``optimizer`` ...).
    ``checkpoint`` (a folder): every training (members, snapshots, fold models) checkpoints
    there each epoch; a rerun with the same arguments skips the finished ones and resumes the
    interrupted one. A checkpoint of other arguments is replaced with a warning; the folder is
    removed when all members are trained.
    """
    builders = list(builder) if isinstance(builder, (list, tuple)) else [builder]
    if diversity not in DIVERSITY:
        raise ConfigError(f"unknown diversity {diversity!r}; choose one of: {', '.join(DIVERSITY)}")
    if diversity == "architectures":
        k = len(builders) if k is None else k
    elif len(builders) != 1:
        raise ConfigError(f"diversity {diversity!r} takes one builder; a list of builders means 'architectures'")
    k = 5 if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k (the number of members) must be a positive integer, got {k!r}")
    if diversity == "snapshot" and epochs % k:
        raise ConfigError(f"snapshot: epochs ({epochs}) must be a multiple of k ({k}), one cosine cycle per member")
    for b in builders:
        if not (isinstance(b, nn.Module) or callable(b)):
            raise ConfigError(f"a builder must be an nn.Module or a callable returning one, got {type(b).__name__}")
    fit_options.setdefault("progress", False)
    run = _Runner(builders, data, k, diversity, epochs, seed, fit_options)
    if checkpoint is not None:
        key = {"op": "members", "k": k, "diversity": diversity, "epochs": epochs, "folds": folds, "seed": seed,
               "fit": {o: v for o, v in fit_options.items() if o not in ("progress", "device")},
               "data": [data.train.x, data.train.y, data.val.x, data.val.y],
               "init": [dict(run.fresh(i, seed + i).state_dict()) for i in range(len(builders))]}
        run.area = Area(checkpoint, fingerprint(key))
    n = len(data.train)
    start = time.perf_counter()
    models, seen = run(np.arange(n), seed)
    seconds = {"members": time.perf_counter() - start, "folds": 0.0}
    oof, fold_sets = None, None
    if folds is not None:
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ConfigError(f"folds must be an integer >= 2, got {folds!r}")
        y = data.train.y.numpy()
        counts = np.bincount(y)
        splitter = (StratifiedKFold if counts[counts > 0].min() >= folds else KFold)(folds, shuffle=True,
                                                                                     random_state=seed)
        c = data.task.num_classes
        features = np.zeros((n, k, c), dtype=np.float64)
        fold_of = np.zeros(n, dtype=np.int64)
        trained_on: list[list[np.ndarray]] = [[] for _ in range(k)]
        fold_sets = []
        from .api import member_probas

        for f, (rest, held) in enumerate(splitter.split(np.zeros(n), y)):
            fold_models, fold_seen = run(rest, seed + 1000 * (f + 1), tag=f"fold-{f}-")
            features[held] = member_probas(fold_models, data.train.subset(held)).transpose(1, 0, 2)
            fold_of[held] = f
            fold_sets.append(fold_models)
            for i in range(k):
                trained_on[i].append(fold_seen[i])
        oof = OutOfFold(features, y, np.arange(n), fold_of, trained_on, "k-fold")
        seconds["folds"] = time.perf_counter() - start - seconds["members"]
    if run.area is not None:
        run.area.clear()
    return Members(models, seen, oof, diversity, seconds, fold_models=fold_sets)


class _Runner:
    """Trains the k members on given training rows: ``run(rows, seed) -> (models, rows seen per model)``."""

    def __init__(self, builders, data, k, diversity, epochs, seed, fit_options):
        self.builders, self.data, self.k, self.diversity = builders, data, k, diversity
        self.epochs, self.fit_options = epochs, fit_options
        self.area: Area | None = None  # where trainings checkpoint (train_members(checkpoint=))

    def resume(self, name: str) -> Resume | None:
        """A finished training's checkpoint is kept: a rerun of the job returns it at once."""
        return Resume(self.area.stage(name), keep=True) if self.area is not None else None

    def fresh(self, i: int, seed: int) -> nn.Module:
        b = self.builders[i % len(self.builders)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            b = torch_of(b)  # a Keras model: its torch translation (deep copies of Keras models rename weights)
            if isinstance(b, nn.Module):
                model = copy.deepcopy(b)
                for m in model.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
                return model
            model = torch_of(b())
        if not isinstance(model, nn.Module):
            raise ConfigError(f"the builder returned {type(model).__name__}, not an nn.Module")
        return model

    def __call__(self, rows: np.ndarray, seed: int, tag: str = ""):
        train = self.data.train
        if self.diversity == "snapshot":
            snaps: dict[int, nn.Module] = {}
            per_cycle = self.epochs // self.k
            start = self.fresh(0, seed)
            for cycle in range(1, self.k + 1):  # snapshots an interrupted run already took
                saved = self.area.load_tensors(f"{tag}snapshot-{cycle}") if self.area is not None else None
                if saved is not None:
                    model = copy.deepcopy(start)
                    model.load_state_dict(saved)
                    snaps[cycle] = derive(model, model.eval(), "snapshot", cycle=cycle)

            def keep(model, row):
                if row["epoch"] % per_cycle == 0:
                    cycle = row["epoch"] // per_cycle
                    snaps[cycle] = derive(model, copy.deepcopy(model).eval(), "snapshot", cycle=cycle)
                    if self.area is not None:  # saved before the epoch's checkpoint
                        self.area.save_tensors(f"{tag}snapshot-{cycle}", model.state_dict())

            fit(start, self.data, epochs=self.epochs, schedule="cosine", cycles=self.k, seed=seed,
                train=train.subset(rows), on_epoch_end=keep, checkpoint=self.resume(f"{tag}snapshot"),
                **self.fit_options)
            return [snaps[c] for c in sorted(snaps)], [rows] * self.k
        # Under torchrun each rank trains its share of the members (member i on rank i % ranks),
        # then every rank receives the others' weights.
        spread = distributed.setup()
        rank, ranks = distributed.world() if spread else (0, 1)
        models, seen = [], []
        rng = np.random.default_rng(seed)
        for i in range(self.k):
            used = rng.choice(rows, size=len(rows), replace=True) if self.diversity == "bagging" else rows
            member = self.fresh(i, seed + i)
            if i % ranks == rank:
                member = fit(member, self.data, epochs=self.epochs, seed=seed + i, train=train.subset(used),
                             parallel=False, checkpoint=self.resume(f"{tag}member-{i}"), **self.fit_options)
            models.append(member)
            seen.append(np.unique(used))
        if spread:
            share_modules(models, owner=lambda i: i % ranks)
            for m in models:
                m.eval()
        return models, seen


def share_modules(models: list, owner) -> None:
    """Make every rank hold rank ``owner(i)``'s weights and metadata for ``models[i]`` (in place).

    Tensors travel by ``broadcast``; the slimfuse metadata (spec, lineage, task) as JSON bytes,
    so nothing is pickled between processes.
    """
    import torch

    from ..models.spec import ATTR

    for i, model in enumerate(models):
        src = owner(i)
        with torch.no_grad():
            for t in model.state_dict().values():
                distributed.broadcast_tensor(t, src)
        meta = distributed.broadcast_json(getattr(model, ATTR, None), src)
        if meta is not None:
            object.__setattr__(model, ATTR, meta)
