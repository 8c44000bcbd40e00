"""``slimfuse.quantize(model, scheme, ...)``: one verb, a registry of schemes behind it.

``scheme`` may carry a parameter after a colon (``"codebook:4"``), passed to the implementation
as ``arg``. Every implementation returns a new module (never mutating its input) whose weights
really are low-precision and whose artifact is really smaller. The options are the fields of
:class:`slimfuse.configs.Quantize` (one name and one default for every backend); a scheme refuses
the options it does not use.
"""

from __future__ import annotations

import inspect

from torch import nn

from .. import configs
from ..errors import ConfigError
from . import codebook, onnx_int8, quant_torch  # noqa: F401  (each registers its schemes)
from .schemes import DEFAULT_BACKEND, SCHEMES


def backend_for(scheme: str, backend: str = "auto") -> str:
    """The backend ``backend`` means for ``scheme`` (``auto``: the measured default)."""
    name = scheme.partition(":")[0]
    chosen = DEFAULT_BACKEND.get(name, backend) if backend == "auto" else backend
    if (name, chosen) not in SCHEMES:
        have = sorted(b for s, b in SCHEMES if s == name)
        raise ConfigError(f"scheme {name!r} has no {chosen!r} backend (available: {', '.join(have)})")
    return chosen


def trains(scheme: str, backend: str = "auto") -> bool:
    """Whether ``scheme`` on ``backend`` fine-tunes (and so checkpoints every epoch and can resume)."""
    fn = SCHEMES[(scheme.partition(":")[0], backend_for(scheme, backend))]
    return "checkpoint" in inspect.signature(fn).parameters


def quantize(model: nn.Module, scheme: str | configs.Quantize, calib=None, *, backend: str = "auto",
             **options) -> nn.Module:
    """Quantize ``model`` with ``scheme`` (e.g. ``int8-dynamic``, ``int8-static``, ``codebook:4``, or a
    :class:`slimfuse.configs.Quantize`, of which the string and keyword form is a shorthand).

    ``calib``: calibration data (a ``Split``, ``Splits`` or tensor) for schemes that need it.
    ``backend``: ``auto`` (the measured default for the scheme), ``torch`` or ``onnxruntime``.
    ``options``: fields of :class:`slimfuse.configs.Quantize` (``samples``, ``calibrator``,
    ``max_drop`` in points, ``exclude`` ...), and ``checkpoint`` for the schemes that fine-tune.
    """
    if isinstance(scheme, configs.Quantize):
        scheme, backend, options = scheme.scheme, scheme.backend, {**scheme.options(), **options}
    if not isinstance(scheme, str) or not scheme:
        raise ConfigError(f"scheme must be a name like 'int8-dynamic', got {scheme!r}")
    runtime = {k: options.pop(k) for k in ("checkpoint", "progress", "seed", "sample", "data") if k in options}
    configs.Quantize.build(scheme=scheme, backend=backend, **options)  # the one set of names and bounds
    name, _, arg = scheme.partition(":")
    fn = SCHEMES[(name, backend_for(scheme, backend))]
    return fn(model, arg=arg or None, calib=calib, **options, **runtime)
