"""``slimfuse.quantize(model, scheme, ...)``: one verb, a registry of schemes behind it.

``scheme`` may carry a parameter after a colon (``"codebook:4"``), passed to the implementation
as ``arg``. Every implementation returns a new module (never mutating its input) whose weights
really are low-precision and whose artifact is really smaller. The options are the fields of
:class:`slimfuse.configs.Quantize` (one name and one default for every backend); a scheme refuses
the options it does not use.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

from .. import configs, devices
from ..errors import ConfigError
from ..models.keras import torch_of
from ..models.spec import lineage_of
from ..validate import COSINE_FLOOR, QUANTIZE_COSINE_FLOOR, QUANTIZE_FLOOR, SAMPLES, check
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
             validate: bool = True, auto_batch: int = 256, auto_max_drop: float = 1.0, **options) -> nn.Module:
    """Quantize ``model`` with ``scheme`` (e.g. ``int8-dynamic``, ``int8-static``, ``codebook:4``, or a
    :class:`slimfuse.configs.Quantize`, of which the string and keyword form is a shorthand).

    ``calib``: calibration data (a ``Split``, ``Splits`` or tensor) for schemes that need it, or data of
    any form :func:`slimfuse.data.feed.feed` reads (a ``DataLoader`` of tuple or dict batches, a
    ``Dataset``, ...): only its first ``samples`` samples (at least 256) are read, labels optional; the
    schemes that fine-tune (``qat``, ``codebook``) also train on all of it, streamed, labels needed.
    Calibration inputs that are not one tensor (keyword inputs of a Hugging Face model) make
    ``backend="auto"`` the torch backend, since the ONNX export takes one tensor input.
    ``backend``: ``torch``, ``onnxruntime`` or ``auto``: where the scheme has several backends (and
    ONNX Runtime int8-static two formats) and ``calib`` gives inputs, each is built and timed on this
    machine at batch ``auto_batch`` over thread counts 1..cores (:func:`slimfuse.compress.choose.choose`),
    and the fastest whose validation accuracy is at most ``auto_max_drop`` points below the input's is
    returned (none within it: the most accurate one, ``within_bound: false``); the timings go into the
    lineage step (``chosen_by``). Without data the scheme's measured default backend is used.
    ``options``: fields of :class:`slimfuse.configs.Quantize` (``samples``, ``calibrator``,
    ``max_drop`` in points, ``exclude`` ...), and ``checkpoint`` for the schemes that fine-tune.
    ``validate``: run the result through :func:`slimfuse.validate.check` (a crash, NaN, collapse
    or failed reload raises ``ValidationError``); ``False`` skips it (recorded in the lineage).
    """
    model = torch_of(model)
    if isinstance(scheme, configs.Quantize):
        options = {**scheme.options(), **options}
        scheme, backend, validate = scheme.scheme, scheme.backend, scheme.validate
        auto_batch, auto_max_drop = options.pop("auto_batch", auto_batch), options.pop("auto_max_drop", auto_max_drop)
    if not isinstance(scheme, str) or not scheme:
        raise ConfigError(f"scheme must be a name like 'int8-dynamic', got {scheme!r}")
    runtime = {k: options.pop(k) for k in ("checkpoint", "progress", "seed", "sample", "data") if k in options}
    if "device" in options:  # a torch.device too; the config checks the name
        options["device"] = str(devices.resolve(options["device"]))
    configs.Quantize.build(scheme=scheme, backend=backend, auto_batch=auto_batch, auto_max_drop=auto_max_drop,
                           **options)  # the one set of names and bounds
    name, _, arg = scheme.partition(":")
    have = sorted(b for s, b in SCHEMES if s == name)
    if name in TRAINING_SCHEMES and "data" not in runtime and _streamed(calib):  # fine-tuned on all of it
        from ..data.feed import feed

        runtime["data"] = feed(calib, labels=True, where="the fine-tuning data")
    calib = _calibration(calib, options.get("samples"))
    _probe(model, calib)
    if backend == "auto" and _several_inputs(calib) and (name, "torch") in SCHEMES:
        backend = "torch"
    if backend == "auto" and len(have) > 1 and calib is not None:
        result = _measured(model, name, arg or None, calib, have, auto_batch, auto_max_drop / 100,
                           {**options, **runtime})
        chosen = str(lineage_of(result)[-1]["params"].get("backend", "auto")).split()[0]  # "onnxruntime qdq"
    else:
        chosen = backend_for(scheme, backend)
        result = SCHEMES[(name, chosen)](model, arg=arg or None, calib=calib, **options, **runtime)
    return check(result, f"quantize({scheme}, backend={chosen})", reference=model if isinstance(model, nn.Module)
                 else None, data=calib, validate=validate, fix=FIXES.get((name, chosen), FIXES[None]),
                 floor=QUANTIZE_FLOOR if name in INT8_SCHEMES else None,
                 cosine_floor=QUANTIZE_COSINE_FLOOR if name in INT8_SCHEMES else COSINE_FLOOR)


def _probe(model, calib) -> None:
    """A torch model that cannot take the calibration inputs: one clear error before any scheme runs."""
    from ..data import Split, Splits
    from ..train import probe

    x = calib.train.x if isinstance(calib, Splits) else calib.x if isinstance(calib, Split) else calib
    if isinstance(model, nn.Module) and isinstance(x, torch.Tensor) and len(x):
        probe(model, x)


TRAINING_SCHEMES = ("qat", "codebook")  # schemes that fine-tune: streamed data is their training data too


def _streamed(calib) -> bool:
    from ..data import Split, Splits

    return calib is not None and not isinstance(calib, (Splits, Split, torch.Tensor, np.ndarray))


def _calibration(calib, samples):
    """In-memory calibration data as it is; any other form (a DataLoader, ...): its first samples, read once."""
    from ..data.feed import feed

    if not _streamed(calib):
        return calib
    return feed(calib, labels=None, where="the calibration data").head(max(int(samples or 512), SAMPLES))


def _several_inputs(calib) -> bool:
    from ..data import Split, Splits

    split = calib.train if isinstance(calib, Splits) else calib
    return isinstance(split, Split) and not isinstance(split.x, torch.Tensor)


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
