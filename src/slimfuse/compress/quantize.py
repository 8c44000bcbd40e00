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


def quantize(model: nn.Module, scheme: str, calib=None, *, backend: str = "auto", auto_batch: int = 256,
             auto_max_drop: float = 0.01, **options) -> nn.Module:
    """Quantize ``model`` with ``scheme`` (e.g. ``int8-dynamic``, ``int8-static``, ``codebook:4``).

    ``calib``: calibration data (a ``Split`` or tensor) for schemes that need it.
    ``backend``: ``torch``, ``onnxruntime`` or ``auto``: where the scheme has several backends (and
    ONNX Runtime int8-static two formats) and ``calib`` gives inputs, each is built and timed on this
    machine at batch ``auto_batch`` over thread counts 1..cores (:func:`slimfuse.compress.choose.choose`),
    and the fastest whose accuracy on labelled ``calib`` (its validation split) is at most
    ``auto_max_drop`` (a fraction) below the input's is returned (none within it: the most accurate
    one, ``within_bound: false``); the timings go into the lineage step (``chosen_by``). Without data the scheme's default backend is used (``chosen_by: "rule"``).
    """
    if not isinstance(scheme, str) or not scheme:
        raise ConfigError(f"scheme must be a name like 'int8-dynamic', got {scheme!r}")
    name, _, arg = scheme.partition(":")
    known = sorted({s for s, _ in SCHEMES})
    if name not in known:
        raise ConfigError(f"unknown quantization scheme {scheme!r} (known: {', '.join(known)})")
    have = sorted(b for s, b in SCHEMES if s == name)
    if backend == "auto" and len(have) > 1 and calib is not None:
        return _measured(model, name, arg or None, calib, have, auto_batch, auto_max_drop, options)
    chosen = DEFAULT_BACKEND[name] if backend == "auto" else backend
    if (name, chosen) not in SCHEMES:
        raise ConfigError(f"scheme {name!r} has no {chosen!r} backend (available: {', '.join(have)})")
    return SCHEMES[(name, chosen)](model, arg=arg or None, calib=calib, **options)


def _measured(model, name, arg, calib, backends, batch, max_drop, options) -> nn.Module:
    """``backend="auto"`` with data: build every backend (and ORT format) of ``name``, keep the fastest in bounds."""
    from ..data import Split, Splits
    from ..models.spec import attach, lineage_of, spec_of, task_of
    from .choose import choose

    def builder(b, extra):
        return lambda: SCHEMES[(name, b)](model, arg=arg, calib=calib, **options, **extra)

    candidates = {"input": lambda: model}  # timed alongside as the reference, never picked
    for b in backends:
        if b == "onnxruntime" and name == "int8-static" and "format" not in options:
            for fmt in ("qdq", "qoperator"):
                candidates[f"{b} {fmt}"] = builder(b, {"format": fmt})
        else:
            candidates[b] = builder(b, {})
    val = calib.val if isinstance(calib, Splits) else calib if isinstance(calib, Split) else None
    choice = choose(model, calib, candidates=candidates, batch=batch, val=val, max_drop=max_drop, reference="input",
                    strict=False)  # none within the bound: the most accurate one, recorded as such
    if choice.model is None:  # every backend failed: the default backend's own error
        return SCHEMES[(name, DEFAULT_BACKEND[name])](model, arg=arg, calib=calib, **options)
    q = choice.model
    lineage = lineage_of(q)
    lineage[-1]["params"].update(backend=choice.name, chosen_by=choice.summary())
    return attach(q, spec_of(q), lineage=lineage, task=task_of(q))


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
    if out.suffix == ".onnx" and backend == "auto" and (scheme.partition(":")[0], "onnxruntime") in SCHEMES:
        backend = "onnxruntime"  # an .onnx file can only hold an ONNX Runtime model
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
