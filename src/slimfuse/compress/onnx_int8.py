"""int8 with ONNX Runtime: ``int8-dynamic`` and ``int8-static`` with ``backend="onnxruntime"``.

Input: a torch module (exported first, parity-checked), an ``OnnxPredictor``, an
``onnx.ModelProto`` or a path to an ``.onnx`` file, so a model from any
framework (TensorFlow/Keras through their ONNX exporters) can be quantized,
measured and ensembled. Output: an ``OnnxPredictor`` holding the int8 ONNX
model (``slimfuse.export(q, "onnx", path)`` writes the deployable file).

Choices, measured on the project's AVX2 CPU (see BENCHMARKS.md): int8 weights
(per output channel by default) with uint8 activations (the U8S8 kernels that
x86 CPUs without VNNI run fastest; S8S8 in QOperator format was 20x slower),
QDQ format for static quantization. Nodes that ONNX Runtime leaves in float
are listed in the lineage step (``float_nodes``), never silently skipped.
"""

from __future__ import annotations

import io
import logging
import tempfile
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch

from ..data import Split, Splits
from ..errors import ConfigError
from ..export import to_onnx
from ..models.spec import derive, spec_of
from ..runtime import OnnxPredictor
from .schemes import register_scheme

METHODS = ("minmax", "percentile", "entropy")
FORMATS = ("qdq", "qoperator")
COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


@register_scheme("int8-dynamic", "onnxruntime", default=True)
def int8_dynamic(model, *, arg=None, calib=None, per_channel: bool = True, sample=None, exclude=None,
                 **unknown) -> OnnxPredictor:
    """int8 weights, activations quantized at run time (``MatMulInteger`` / ``DynamicQuantizeLinear``).

    ``exclude``: names of ONNX nodes to keep in float (mixed precision).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _check(arg, unknown, "int8-dynamic", ("per_channel", "sample", "exclude"))
    if sample is None and calib is not None:
        sample = _calib_inputs(calib)
    src = to_onnx(model, sample=sample)
    exclude = sorted(exclude or ())
    missing = set(exclude) - {n.name for n in src.proto.graph.node}
    if missing:
        raise ConfigError(f"int8-dynamic: no node named {', '.join(sorted(missing))} in the ONNX graph")
    with _workdir(src) as (fp32, out):
        # DefaultTensorType: graphs from ONNX Runtime's transformer optimizer lack some type annotations
        quantize_dynamic(fp32, out, per_channel=bool(per_channel), weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        q = OnnxPredictor.from_bytes(out.read_bytes(), threads=src.threads, input_layout=src.input_layout,
                                     output=src.output)
    return _record(src, q, "int8-dynamic", per_channel=bool(per_channel), exclude=exclude or None)


@register_scheme("int8-static", "onnxruntime", default=True)
def int8_static(model, *, arg=None, calib=None, calibrator: str = "minmax", per_channel: bool = True,
                format: str = "qdq", samples: int = 512, percentile: float = 99.99, op_types=None,
                **unknown) -> OnnxPredictor:
    """int8 weights and activations, activation ranges calibrated on ``calib`` (required).

    ``calibrator``: ``minmax``, ``percentile`` (``percentile`` of |activation|) or ``entropy`` (KL);
    ``format``: ``qdq`` (Quantize/DequantizeLinear pairs ORT fuses) or ``qoperator`` (QLinear* ops);
    ``samples``: at most this many calibration inputs are used; ``op_types``: quantize only these ONNX
    op types (e.g. ``["MatMul"]`` for transformers; default: every type ONNX Runtime can quantize).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    _check(arg, unknown, "int8-static", ("calibrator", "per_channel", "format", "samples", "percentile", "op_types"))
    if calib is None:
        raise ConfigError("int8-static needs calibration data: pass calib=data (CLI: --data)")
    if calibrator not in METHODS:
        raise ConfigError(f"unknown calibrator {calibrator!r} (choose {', '.join(METHODS)})")
    if format not in FORMATS:
        raise ConfigError(f"unknown ONNX quantization format {format!r} (choose {', '.join(FORMATS)})")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples must be a positive integer, got {samples!r}")
    if not 50.0 < float(percentile) <= 100.0:
        raise ConfigError(f"percentile must be in (50, 100], got {percentile!r}")
    x = _calib_inputs(calib)[:samples]
    src = to_onnx(model, sample=x)
    # MatMulConstBOnly: only weight matmuls; activation x activation products (attention scores, whose
    # additive padding mask spans -10000..x) would lose all resolution on an 8-bit grid
    extra = {"MatMulConstBOnly": True}
    if calibrator == "percentile":
        extra["CalibPercentile"] = float(percentile)
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[calibrator]
    qformat = QuantFormat.QDQ if format == "qdq" else QuantFormat.QOperator
    with _workdir(src) as (fp32, out):
        quantize_static(fp32, out, _Reader(src, x), quant_format=qformat, per_channel=bool(per_channel),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calibrate, extra_options=extra,
                        op_types_to_quantize=list(op_types) if op_types else None)
        q = OnnxPredictor.from_bytes(out.read_bytes(), threads=src.threads, input_layout=src.input_layout,
                                     output=src.output)
    params = {"calibrator": calibrator, "per_channel": bool(per_channel), "format": format, "samples": len(x)}
    if calibrator == "percentile":
        params["percentile"] = float(percentile)
    if op_types:
        params["op_types"] = list(op_types)
    return _record(src, q, "int8-static", **params)


def float_nodes(proto: onnx.ModelProto) -> list[str]:
    """Compute nodes (MatMul/Gemm/Conv) whose weights are still float after quantization."""
    dequantized = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    left = []
    for n in proto.graph.node:
        if n.op_type in COMPUTE_OPS and len(n.input) > 1:
            weight = n.input[1]
            if weight in inits or weight not in dequantized:
                left.append(n.name or n.op_type)
    return left


def _record(src: OnnxPredictor, q: OnnxPredictor, scheme: str, **params) -> OnnxPredictor:
    left = float_nodes(q.proto)
    return derive(src, q, "quantize", spec=spec_of(q), scheme=scheme, backend="onnxruntime",
                  float_nodes=left or None, **params)


def _check(arg, unknown: dict, scheme: str, known: tuple[str, ...]) -> None:
    if arg is not None:
        raise ConfigError(f"{scheme} takes no parameter after ':', got {arg!r}")
    if unknown:
        raise ConfigError(f"unknown option(s) for {scheme} (onnxruntime): {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(known)})")


def _calib_inputs(calib) -> torch.Tensor:
    if isinstance(calib, Splits):  # calibrate on training inputs, like the torch backend
        calib = calib.train
    if isinstance(calib, Split):
        x = calib.x
    elif isinstance(calib, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(calib, dtype=np.float32))
    elif isinstance(calib, torch.Tensor):
        x = calib if not calib.is_floating_point() else calib.float()  # token ids stay int64
    else:
        raise ConfigError(f"calib must be Splits, a Split, a tensor or an array, got {type(calib).__name__}")
    if len(x) == 0:
        raise ConfigError("the calibration data is empty")
    return x


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a tensor, in equal batches of 64.

    The histogram calibrators (percentile, entropy) stack per-batch outputs, so a short last batch
    is dropped (all of ``x`` is one batch when it has fewer than 64 samples).
    """

    def __init__(self, pred: OnnxPredictor, x: torch.Tensor, batch: int = 64):
        name = pred._io["input"]
        if len(x) > batch:
            x = x[: len(x) // batch * batch]
        self.batches = iter([{name: pred.feed(x[i:i + batch])} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


@contextmanager
def _workdir(src: OnnxPredictor):
    """Temp folder with the fp32 model written as a file (ORT's quantizers take paths); quiets ORT's chatter."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs "consider pre-processing" on the root logger and prints progress
    try:
        with tempfile.TemporaryDirectory(prefix="slimfuse-ort-") as tmp, redirect_stdout(io.StringIO()):
            fp32, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            fp32.write_bytes(src.model_bytes())
            yield fp32, out
    finally:
        root.setLevel(level)
