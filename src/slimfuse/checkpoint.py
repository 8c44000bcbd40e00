"""Per-epoch training checkpoints that resume bit-exactly, without pickle.

A checkpoint is a folder (written atomically) with ``state.safetensors`` (model,
optimizer tensors, RNG states, best weights, a technique's extra state such as
pruning masks) and ``state.json`` (epoch, key, optimizer/scheduler scalars,
history). ``key`` identifies the run (parameters, training data and initial
weights): a checkpoint from a different run is ignored with a warning and
replaced, never mixed in.

Jobs made of several trainings (ensemble members, structured pruning steps) keep
their checkpoints in an :class:`Area`: a folder with ``job.json`` (the job's key)
and one checkpoint folder per stage. A finished stage's checkpoint is kept
(``Resume(keep=True)``), so a rerun skips it; the area is removed when the job ends.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from .distributed import is_main
from .errors import ArtifactError
from .models.artifact import atomic_folder, save_safetensors, write_bytes_atomic

TENSORS, META, JOB = "state.safetensors", "state.json", "job.json"


def beside(out: str | Path) -> Path:
    """The checkpoint folder of a command writing ``out``: a hidden sibling, ``.NAME.checkpoint``."""
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor {t.dtype} {tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        h.update(f"array {value.dtype} {value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(json.dumps(str(k)).encode())
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    elif callable(value):  # a hook or builder: by name (its code and closure cannot be hashed)
        name = getattr(value, "__qualname__", type(value).__name__)
        h.update(f"callable {getattr(value, '__module__', '')}.{name}".encode())
    else:
        h.update(json.dumps(value, default=str).encode())


def fingerprint(*values) -> str:
    """A stable hash of nested dicts/lists of JSON values, tensors and arrays (by content)."""
    h = hashlib.sha256()
    for v in values:
        _feed(h, v)
    return h.hexdigest()[:32]


def run_key(model: nn.Module, params: dict) -> str:
    """Hash of the run's parameters and the model's initial weights."""
    return fingerprint(params, dict(model.state_dict()))


@dataclass
class Resume:
    """What ``fit(..., checkpoint=Resume(...))`` checkpoints, beyond a folder.

    ``key``: extra values that identify the run (a technique's parameters, a teacher's
    outputs...), mixed into the checkpoint's key. ``state``: an object with ``state_dict()``
    and ``load_state_dict(d)`` (nested dicts/lists of tensors and JSON values) saved with every
    epoch and restored on resume, e.g. pruning masks and schedule position. ``keep``: keep the
    checkpoint of a finished run (a stage of a longer job), so a rerun returns at once.
    """

    folder: str | Path
    key: dict = field(default_factory=dict)
    state: object | None = None
    keep: bool = False


def _split_state(prefix: str, state: dict, tensors: dict) -> object:
    """Move every tensor of a nested state dict into ``tensors``; return the JSON-able rest."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {"__dict__": [[k, _split_state(f"{prefix}/{k}", v, tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        return [_split_state(f"{prefix}/{i}", v, tensors) for i, v in enumerate(state)]
    return state


def _join_state(meta: object, tensors: dict) -> object:
    if isinstance(meta, dict) and "__tensor__" in meta:
        return tensors[meta["__tensor__"]]
    if isinstance(meta, dict) and "__dict__" in meta:
        return {k: _join_state(v, tensors) for k, v in meta["__dict__"]}
    if isinstance(meta, list):
        return [_join_state(v, tensors) for v in meta]
    return meta


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies in memory the allocator owns and aligns: the optimizer and a technique's masks keep
    these tensors, and a tensor read from a file sits at the file's offsets (8-byte aligned), where
    MKL's kernels may take another code path than for the aligned tensors of an uninterrupted run."""
    return {k: v.clone() for k, v in tensors.items()}


class Checkpoint:
    def __init__(self, folder: str | Path, key: str):
        self.folder, self.key = Path(folder), key

    def save(self, *, epoch: int, model, opt, sched, gen, best, since_best: int, history: list,
             extra=None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        meta = {
            "key": self.key,
            "epoch": epoch,
            "since_best": since_best,
            "best_accuracy": best[0],
            "history": history,
            "model": _split_state("model", model.state_dict(), tensors),
            "opt": _split_state("opt", opt.state_dict(), tensors),
            "sched": _split_state("sched", sched.state_dict(), tensors) if sched is not None else None,
            "best": _split_state("best", best[1], tensors) if best[1] is not None else None,
            "extra": _split_state("extra", extra.state_dict(), tensors) if extra is not None else None,
        }
        tensors["rng/gen"] = gen.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        with atomic_folder(self.folder, marker=META) as tmp:
            save_safetensors(tensors, tmp / TENSORS, self.folder)
            (tmp / META).write_text(json.dumps(meta))

    def load(self, *, model, opt, sched, gen, extra=None) -> dict | None:
        """Restore a matching checkpoint in place; return its epoch/best/history, or None."""
        if (self.folder / JOB).is_file():  # the area of a multi-stage job, e.g. another command's
            warnings.warn(f"replacing checkpoint {self.folder}: it belongs to another run", stacklevel=3)
            self.clear()
        if not (self.folder / META).is_file():
            return None
        try:
            meta = json.loads((self.folder / META).read_text())
            tensors = _owned(load_file(str(self.folder / TENSORS)))
        except Exception as e:  # damaged: start over rather than resume from garbage
            warnings.warn(f"ignoring unreadable checkpoint {self.folder}: {e}", stacklevel=3)
            return None
        if meta.get("key") != self.key or (extra is not None and meta.get("extra") is None):
            warnings.warn(f"ignoring checkpoint {self.folder}: it belongs to a run with other parameters", stacklevel=3)
            return None
        model.load_state_dict(_join_state(meta["model"], tensors))
        opt.load_state_dict(_join_state(meta["opt"], tensors))
        if sched is not None and meta["sched"] is not None:
            sched.load_state_dict(_join_state(meta["sched"], tensors))
        gen.set_state(tensors["rng/gen"])
        torch.set_rng_state(tensors["rng/torch"])
        if extra is not None:
            extra.load_state_dict(_join_state(meta["extra"], tensors))
        best_state = _join_state(meta["best"], tensors) if meta["best"] is not None else None
        return {
            "epoch": meta["epoch"],
            "best": (meta["best_accuracy"], best_state),
            "since_best": meta["since_best"],
            "history": meta["history"],
        }

    def clear(self) -> None:
        remove(self.folder)


def remove(folder: Path) -> None:
    """Remove a finished job's checkpoint folder and the temp siblings a killed save of it left
    (``.NAME.tmp-*``, ``.NAME.old-*``): the job is done, nothing of it is needed any more."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.is_dir():
        for sibling in [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
            shutil.rmtree(sibling, ignore_errors=True)


class Area:
    """The checkpoint folder of a multi-stage job: ``job.json`` (the job's key) and one
    checkpoint per stage. Opening it with another key (a run with other parameters) warns and
    empties it; a folder that is not a checkpoint is never touched (ArtifactError)."""

    def __init__(self, folder: str | Path, key: str):
        self.folder, self.key = Path(folder), key
        if self.folder.exists():
            try:
                mine = json.loads((self.folder / JOB).read_text()).get("key") == key
            except (OSError, ValueError, AttributeError):
                mine = False
            if not mine and is_main():
                ours = (self.folder / JOB).is_file() or (self.folder / META).is_file()
                if not ours and any(self.folder.iterdir()):
                    raise ArtifactError(f"{self.folder} exists and is not a slimfuse checkpoint; refusing to use it")
                if any(self.folder.iterdir()):
                    warnings.warn(f"replacing checkpoint {self.folder}: it belongs to a run with other parameters",
                                  stacklevel=3)
                self.clear()
        if not (self.folder / JOB).is_file():
            write_bytes_atomic(self.folder / JOB, json.dumps({"key": key}).encode())

    def stage(self, name: str) -> Path:
        return self.folder / name

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep a finished stage's tensors (e.g. a snapshot's weights) as ``NAME.safetensors``."""
        write_bytes_atomic(self.folder / f"{name}.safetensors",
                           save({k: v.detach().contiguous().clone() for k, v in tensors.items()}))

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            return _owned(load_file(str(path)))
        except Exception as e:  # damaged: redo that stage
            warnings.warn(f"ignoring unreadable checkpoint {path}: {e}", stacklevel=3)
            return None

    def clear(self) -> None:
        if is_main():
            remove(self.folder)
