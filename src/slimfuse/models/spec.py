"""What slimfuse knows about a module: its spec, lineage and task.

A spec is a JSON-able dict that rebuilds the module's architecture:
``{"arch": "mlp", "args": {...}}`` for a registered architecture, or
``{"factory": "package.module:function", "args": {...}}`` for a user's own.
It travels on the module as the attribute ``slimfuse`` and is written to
``card.json`` on save. Techniques never mutate their input; they return a new
module whose lineage is the input's plus one step (:func:`derive`).
"""

from __future__ import annotations

import copy
import json

from torch import nn

ATTR = "slimfuse"


def attach(model: nn.Module, spec: dict, *, lineage: list | None = None, task: dict | None = None) -> nn.Module:
    """Record ``spec`` (and optionally lineage and task) on ``model``; returns ``model``."""
    json.dumps(spec)  # fail early on anything that cannot go into card.json
    meta = {"spec": _canonical(spec), "lineage": _canonical(list(lineage or [])), "task": _canonical(task)}
    object.__setattr__(model, ATTR, meta)
    return model


def _canonical(value):
    """``value`` exactly as a reloaded card.json gives it back (sorted keys, lists for tuples), so a
    module's lineage reads the same in memory and after save/load (recipes hash and print it)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError):  # not JSON-able: kept as is (saving such a module fails anyway)
        return copy.deepcopy(value)


def _meta(model: nn.Module) -> dict:
    meta = getattr(model, ATTR, None)
    if meta:
        return meta
    # a transformers model carries its own description: its class and config (models/hf.py)
    if type(model).__module__.startswith("transformers."):
        from ..errors import ArtifactError
        from .hf import is_hf, spec_for

        if is_hf(model):
            try:
                return {"spec": spec_for(model), "lineage": [], "task": None}
            except ArtifactError:  # changed beyond what a spec records: save() says why
                pass
    return {"spec": None, "lineage": [], "task": None}


def spec_of(model: nn.Module) -> dict | None:
    return copy.deepcopy(_meta(model)["spec"])


def lineage_of(model: nn.Module) -> list[dict]:
    return copy.deepcopy(_meta(model)["lineage"])


def task_of(model: nn.Module) -> dict | None:
    return copy.deepcopy(_meta(model)["task"])


def set_task(model: nn.Module, task: dict) -> nn.Module:
    """Record the task (classes, input shape) a model was trained for, keeping spec and lineage."""
    meta = _meta(model)
    return attach(model, meta["spec"], lineage=meta["lineage"], task=task) if meta["spec"] is not None else model


def derive(source: nn.Module, result: nn.Module, op: str, *, spec: dict | None = None, **params) -> nn.Module:
    """Give ``result`` the spec (or a new one), task and lineage of ``source`` plus step ``op``."""
    meta = _meta(source)
    new_spec = spec if spec is not None else meta["spec"]
    step = {"op": op, "params": {k: v for k, v in params.items() if v is not None}}
    if getattr(source, "slimfuse_output", None) is not None and getattr(result, "slimfuse_output", None) is None:
        object.__setattr__(result, "slimfuse_output", source.slimfuse_output)  # models/calling.py: the output selector
    return attach(result, new_spec, lineage=meta["lineage"] + [step], task=meta["task"])


def lineage_str(lineage: list[dict]) -> str:
    """``train -> prune(sparsity=0.9) -> quantize(scheme=int8)``."""
    parts = []
    for step in lineage:
        params = ", ".join(f"{k}={v}" for k, v in step.get("params", {}).items() if not isinstance(v, (dict, list)))
        parts.append(f"{step['op']}({params})" if params else step["op"])
    return " -> ".join(parts) or "(none)"
