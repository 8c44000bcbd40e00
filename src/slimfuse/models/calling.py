"""How slimfuse calls a model and reads what it returns: one convention for every verb.

``forward(model, inputs)`` calls ``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple of
tensors and ``model(**inputs)`` for a dict of tensors (``input_ids``, ``attention_mask``, ... as
Hugging Face models take them), then reduces the output to one tensor with :func:`select`: a
tensor is itself; a dict or a ``transformers`` ``ModelOutput`` gives its ``logits`` (or its only
tensor); a tuple or list gives its first element (``return_dict=False`` puts the logits first);
another object with a ``logits`` attribute gives that. A model whose output needs another choice
carries its own selector: :func:`set_output` (``"pooler_output"``, an index, or a callable
``out -> Tensor``), which techniques carry over to the models they derive (``spec.derive``). A key
or an index is stored in the artifact's card (``output``; an ensemble's members' in its spec,
``outputs``) and restored by ``load``; a callable cannot be, so saving such a model is an error.

``fit``, ``predict``, ``evaluate``, ``measure``, ``distill``, calibration and the validation gate
call models only through :func:`forward`, so a model of any of these conventions needs no glue.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import DataError

OUTPUT = "slimfuse_output"  # attribute: a model's own output selector (see set_output)

Selector = str | int | Callable | None


def call(model, inputs):
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)`` by the form of ``inputs``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def select(out, output: Selector = None):
    """One tensor from a model's output (module docstring); ``output`` overrides the default choice."""
    if output is not None:
        try:
            if callable(output):
                return output(out)
            if isinstance(output, int):
                return out[output]
            if isinstance(out, Mapping):
                return out[output]
            return getattr(out, output)
        except (KeyError, IndexError, AttributeError, TypeError):
            raise DataError(f"the model's output ({_kind(out)}) has no {output!r}") from None
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out:
            return out["logits"]
        found = [v for v in out.values() if isinstance(v, torch.Tensor)]
        if len(found) == 1:
            return found[0]
        raise DataError(f"the model returns {_kind(out)} without 'logits'; tell slimfuse which output to use: "
                        "slimfuse.set_output(model, 'key')")
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return out  # arrays from a callable teacher, ...: the caller checks


def _kind(out) -> str:
    if isinstance(out, Mapping):
        return f"{type(out).__name__} with keys {', '.join(map(repr, out.keys()))}"
    return type(out).__name__


def selector(model) -> Selector:
    """The model's own output selector (``None``: the default choice); DDP wrappers are looked through."""
    inner = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(inner, OUTPUT, None)


def forward(model, inputs) -> torch.Tensor:
    """Call ``model`` on ``inputs`` by the convention and return the selected output tensor."""
    return select(call(model, inputs), selector(model))


def set_output(model: nn.Module, output: Selector) -> nn.Module:
    """Make slimfuse read ``output`` of what ``model`` returns (a key or attribute name, an index, or a
    callable ``out -> Tensor``); returns ``model``. ``None`` restores the default choice."""
    if output is not None and not isinstance(output, (str, int)) and not callable(output):
        raise DataError(f"output must be a key, an index or a callable, got {type(output).__name__}")
    object.__setattr__(model, OUTPUT, output)
    return model
