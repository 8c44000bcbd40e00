"""Per-epoch training checkpoints that resume bit-exactly, without pickle.

A checkpoint is a folder (written atomically) with ``state.safetensors`` (model,
optimizer tensors, RNG states, best weights) and ``state.json`` (epoch, key,
optimizer/scheduler scalars, history). ``key`` identifies the run (parameters
and initial weights): a checkpoint from a different run is ignored, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .models.artifact import atomic_folder

TENSORS, META = "state.safetensors", "state.json"


def run_key(model: nn.Module, params: dict) -> str:
    """Hash of the run's parameters and the model's initial weights."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


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


class Checkpoint:
    def __init__(self, folder: str | Path, key: str):
        self.folder, self.key = Path(folder), key

    def save(self, *, epoch: int, model, opt, sched, gen, best, since_best: int, history: list) -> None:
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
        }
        tensors["rng/gen"] = gen.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        with atomic_folder(self.folder, marker=META) as tmp:
            save_file(tensors, str(tmp / TENSORS))
            (tmp / META).write_text(json.dumps(meta))

    def load(self, *, model, opt, sched, gen) -> dict | None:
        """Restore a matching checkpoint in place; return its epoch/best/history, or None."""
        if not (self.folder / META).is_file():
            return None
        try:
            meta = json.loads((self.folder / META).read_text())
            tensors = load_file(str(self.folder / TENSORS))
        except Exception as e:  # damaged: start over rather than resume from garbage
            warnings.warn(f"ignoring unreadable checkpoint {self.folder}: {e}", stacklevel=3)
            return None
        if meta.get("key") != self.key:
            warnings.warn(f"ignoring checkpoint {self.folder}: it belongs to a run with other parameters", stacklevel=3)
            return None
        model.load_state_dict(_join_state(meta["model"], tensors))
        opt.load_state_dict(_join_state(meta["opt"], tensors))
        if sched is not None and meta["sched"] is not None:
            sched.load_state_dict(_join_state(meta["sched"], tensors))
        gen.set_state(tensors["rng/gen"])
        torch.set_rng_state(tensors["rng/torch"])
        best_state = _join_state(meta["best"], tensors) if meta["best"] is not None else None
        return {
            "epoch": meta["epoch"],
            "best": (meta["best_accuracy"], best_state),
            "since_best": meta["since_best"],
            "history": meta["history"],
        }

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
