"""``slimfuse.quantize(model, scheme, ...)``: one verb, a registry of schemes behind it.

A scheme is registered per backend with :func:`register_scheme`. ``scheme`` may
carry a parameter after a colon (``"codebook:4"``), passed to the implementation
as ``arg``. Every implementation returns a new module (never mutating its input)
whose weights really are low-precision and whose artifact is really smaller.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from ..validate import COSINE_FLOOR, QUANTIZE_COSINE_FLOOR, QUANTIZE_FLOOR, check

# (scheme, backend) -> fn(model, *, arg, calib, **options) -> nn.Module
SCHEMES: dict[tuple[str, str], Callable[..., nn.Module]] = {}
# scheme -> the backend used when backend="auto" (chosen by measurement, see BENCHMARKS.md)
DEFAULT_BACKEND: dict[str, str] = {}


def register_scheme(name: str, backend: str = "torch", *, default: bool = False):
    def deco(fn):
        SCHEMES[(name, backend)] = fn
        if default or name not in DEFAULT_BACKEND:
            DEFAULT_BACKEND[name] = backend
        return fn

    return deco


def quantize(model: nn.Module, scheme: str, calib=None, *, backend: str = "auto", validate: bool = True,
             **options) -> nn.Module:
    """Quantize ``model`` with ``scheme`` (e.g. ``int8-dynamic``, ``int8-static``, ``codebook:4``).

    ``calib``: calibration data (a ``Split`` or tensor) for schemes that need it.
    ``backend``: ``auto`` (the measured default for the scheme), ``torch`` or ``onnxruntime``.
    ``validate``: run the result through :func:`slimfuse.validate.check` (a crash, NaN, collapse
    or failed reload raises ``ValidationError``); ``False`` skips it (recorded in the lineage).
    """
    if not isinstance(scheme, str) or not scheme:
        raise ConfigError(f"scheme must be a name like 'int8-dynamic', got {scheme!r}")
    name, _, arg = scheme.partition(":")
    known = sorted({s for s, _ in SCHEMES})
    if name not in known:
        raise ConfigError(f"unknown quantization scheme {scheme!r} (known: {', '.join(known)})")
    chosen = DEFAULT_BACKEND[name] if backend == "auto" else backend
    if (name, chosen) not in SCHEMES:
        have = sorted(b for s, b in SCHEMES if s == name)
        raise ConfigError(f"scheme {name!r} has no {chosen!r} backend (available: {', '.join(have)})")
    result = SCHEMES[(name, chosen)](model, arg=arg or None, calib=calib, **options)
    return check(result, f"quantize({scheme}, backend={chosen})", reference=model if isinstance(model, nn.Module)
                 else None, data=calib, validate=validate, fix=FIXES.get((name, chosen), FIXES[None]),
                 floor=QUANTIZE_FLOOR if name in INT8_SCHEMES else None,
                 cosine_floor=QUANTIZE_COSINE_FLOOR if name in INT8_SCHEMES else COSINE_FLOOR)


INT8_SCHEMES = ("int8-dynamic", "int8-static", "qat", "mixed")  # near-lossless: the gate's higher floors


# what to try when a scheme's result fails validation
FIXES = {
    ("int8-static", "onnxruntime"): "op_types=['MatMul'] (quantize weight matmuls only), calibrator='percentile', "
                                    "backend='torch', or for a sentence encoder slimfuse.nlp.int8 (fused graph)",
    ("int8-dynamic", "onnxruntime"): "backend='torch', or exclude= the failing nodes",
    ("int8-static", "torch"): "backend='onnxruntime', scheme 'mixed' (keeps sensitive layers in float) or "
                              "'int8-dynamic'",
    ("int8-dynamic", "torch"): "backend='onnxruntime'",
    None: "another scheme or backend=, or validate=False to inspect the result",
}



def checkpoint_option(scheme: str, backend: str, checkpoint: str | Path | None) -> dict:
    """``{"checkpoint": checkpoint}`` when ``scheme`` on ``backend`` fine-tunes (and so can resume), else ``{}``."""
    name = scheme.partition(":")[0]
    fn = SCHEMES.get((name, DEFAULT_BACKEND.get(name) if backend == "auto" else backend))
    if checkpoint is not None and fn is not None and "checkpoint" in inspect.signature(fn).parameters:
        return {"checkpoint": checkpoint}
    return {}


def quantize_file(source: str | Path, scheme: str, out: str | Path, data=None, *, backend: str = "auto",
                  trust_factory: bool = False, checkpoint: str | Path | None = None, **options) -> str:
    """Quantize an artifact folder or an ``.onnx`` file; write an artifact folder, or an ``.onnx`` file.

    ``data`` (Splits) calibrates (training split), fine-tunes (qat, codebook) and validates (mixed);
    its test split is measured into the card. ``checkpoint`` (a folder): schemes that fine-tune
    checkpoint every epoch there and resume when rerun. Returns a one-line summary (the CLI's ``quantize``).
    """
    from ..export import export
    from ..models import folder_bytes, load, save
    from ..runtime import OnnxPredictor, load_onnx
    from ..train import evaluate

    source, out = Path(source), Path(out)
    is_onnx = source.is_file() and source.suffix == ".onnx"
    model = load_onnx(source) if is_onnx else load(source, trust_factory=trust_factory)
    chosen = DEFAULT_BACKEND.get(scheme.partition(":")[0]) if backend == "auto" else backend
    if out.suffix == ".onnx" and chosen != "onnxruntime":
        raise ConfigError(f"{scheme} ({chosen}) gives a torch model: write an artifact folder, not {out.name}")
    options.update(checkpoint_option(scheme, backend, checkpoint))
    q = quantize(model, scheme, calib=data, backend=backend, **options)
    metrics = {"val": evaluate(q, data.val), "test": evaluate(q, data.test)} if data is not None else {}
    if isinstance(q, OnnxPredictor) and out.suffix == ".onnx":
        nbytes = export(q, "onnx", out).bytes
    else:
        save(q, out, metrics=metrics)
        nbytes = folder_bytes(out)
    acc = f", test accuracy {metrics['test']['accuracy']:.4f}" if metrics else ""
    return f"wrote {out} ({scheme}, {nbytes:,} bytes{acc})"


from . import codebook, onnx_int8, quant_torch  # noqa: E402,F401  (register the schemes)
