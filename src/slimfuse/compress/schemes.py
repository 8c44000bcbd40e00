"""The registry of quantization schemes (a leaf: the backends register here, ``quantize`` reads it).

A scheme is registered per backend with :func:`register_scheme`; ``DEFAULT_BACKEND`` holds the
backend ``backend="auto"`` picks for a scheme (chosen by measurement, see BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# (scheme, backend) -> fn(model, *, arg, calib, **options) -> nn.Module
SCHEMES: dict[tuple[str, str], Callable[..., nn.Module]] = {}
DEFAULT_BACKEND: dict[str, str] = {}


def register_scheme(name: str, backend: str = "torch", *, default: bool = False):
    def deco(fn):
        SCHEMES[(name, backend)] = fn
        if default or name not in DEFAULT_BACKEND:
            DEFAULT_BACKEND[name] = backend
        return fn

    return deco
