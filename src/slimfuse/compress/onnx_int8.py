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
                exclude=None, exclude_extreme: bool = True, **unknown) -> OnnxPredictor:
    """int8 weights and activations, activation ranges calibrated on ``calib`` (required).

    ``calibrator``: ``minmax``, ``percentile`` (``percentile`` of |activation|) or ``entropy`` (KL);
    ``format``: ``qdq`` (Quantize/DequantizeLinear pairs ORT fuses) or ``qoperator`` (QLinear* ops);
    ``samples``: at most this many calibration inputs are used; ``op_types``: quantize only these ONNX
    op types (e.g. ``["MatMul"]`` for transformers; default: every type ONNX Runtime can quantize).
    ``exclude``: names of ONNX nodes to keep in float. ``exclude_extreme`` (default on): nodes that
    read or write an *extreme* tensor (any |value| >= ``EXTREME`` or non-finite: an additive
    attention mask of ``finfo.min`` or -10000, found among the constants and on the calibration
    sample, and followed through elementwise ops) stay in float, since one such value stretches
    an 8-bit grid until everything else rounds to one step; the lineage lists them with the reason.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    _check(arg, unknown, "int8-static", ("calibrator", "per_channel", "format", "samples", "percentile", "op_types",
                                         "exclude", "exclude_extreme"))
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
    names = {n.name for n in src.proto.graph.node}
    missing = set(exclude or ()) - names
    if missing:
        raise ConfigError(f"int8-static: no node named {', '.join(sorted(missing))} in the ONNX graph")
    extreme = extreme_nodes(src, x[:64]) if exclude_extreme else {}
    excluded = sorted(set(exclude or ()) | set(extreme))
    # MatMulConstBOnly: only weight matmuls; activation x activation products (attention scores, whose
    # additive padding mask spans -10000..x) would lose all resolution on an 8-bit grid
    extra = {"MatMulConstBOnly": True}
    if calibrator == "percentile":
        extra["CalibPercentile"] = float(percentile)
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[calibrator]
    qformat = QuantFormat.QDQ if format == "qdq" else QuantFormat.QOperator
    with _workdir(src) as (fp32, out):
        try:
            quantize_static(fp32, out, _Reader(src, x), quant_format=qformat, per_channel=bool(per_channel),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=calibrate, extra_options=extra, nodes_to_exclude=excluded,
                            op_types_to_quantize=list(op_types) if op_types else None)
        except ValueError as e:  # e.g. numpy's histogram over a mask tensor (the histogram calibrators)
            raise ConfigError(f"int8-static: ONNX Runtime's {calibrator} calibration failed on this graph "
                              f"({str(e).splitlines()[0]}); try calibrator='minmax' or op_types=['MatMul']") from None
        q = OnnxPredictor.from_bytes(out.read_bytes(), threads=src.threads, input_layout=src.input_layout,
                                     output=src.output)
    params = {"calibrator": calibrator, "per_channel": bool(per_channel), "format": format, "samples": len(x)}
    if calibrator == "percentile":
        params["percentile"] = float(percentile)
    if op_types:
        params["op_types"] = list(op_types)
    if exclude:
        params["exclude"] = sorted(exclude)
    if extreme:
        params["extreme_nodes"] = extreme
    return _record(src, q, "int8-static", **params)


EXTREME = 1e4  # |value| from which a tensor counts as a mask / sentinel, not an activation
# ops through which an extreme constant flows into the tensors they produce
FLOWS = {"Add", "Sub", "Mul", "Div", "Neg", "Where", "Cast", "Expand", "Unsqueeze", "Squeeze", "Reshape", "Concat",
         "Transpose", "Max", "Min", "Tile", "Slice", "Gather", "Identity", "Flatten", "Clip"}


def extreme_nodes(src: OnnxPredictor, x: torch.Tensor) -> dict[str, str]:
    """Nodes that read or write an extreme tensor (see ``int8_static``): ``{node name: reason}``.

    Extreme tensors: float constants (initializers, ``Constant`` nodes) holding a value of magnitude
    at least ``EXTREME`` or a non-finite one, every tensor an elementwise op (``FLOWS``) computes from
    one, and every float tensor that reaches such values on ``x`` (the fp32 graph run once).
    """
    from onnx import numpy_helper

    graph = src.proto.graph

    def extreme(a: np.ndarray) -> bool:
        return a.dtype.kind == "f" and a.size > 0 and not bool((np.abs(a.astype(np.float64)) < EXTREME).all())

    why: dict[str, str] = {}
    for t in graph.initializer:
        if extreme(numpy_helper.to_array(t)):
            why[t.name] = "constant"
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and extreme(numpy_helper.to_array(a.t)):
                    why[n.output[0]] = "constant"
    for name, value in _intermediates(src, x).items():
        if name not in why and extreme(value):
            why[name] = "calibration sample"
    for n in graph.node:  # graph order is topological
        if n.op_type in FLOWS and any(i in why for i in n.input):
            for o in n.output:
                why.setdefault(o, "computed from an extreme constant")
    out = {}
    for n in graph.node:
        if n.op_type == "Constant":
            continue
        hit = [t for t in list(n.input) + list(n.output) if t in why]
        if hit and n.name:
            out[n.name] = f"extreme values (|x| >= {EXTREME:g}, e.g. an attention mask) in {hit[0]} ({why[hit[0]]})"
    return out


def _intermediates(src: OnnxPredictor, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every float tensor of the fp32 graph on input ``x`` (one ONNX Runtime run with all of them as outputs)."""
    import onnxruntime as ort

    proto = onnx.ModelProto()
    proto.CopyFrom(src.proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # a graph shape inference cannot handle: constants alone decide
        return {}
    have = {o.name for o in proto.graph.output}
    for vi in inferred.graph.value_info:
        if vi.name not in have and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            proto.graph.output.append(vi)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = src.threads or 1
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, {sess.get_inputs()[0].name: src.feed(x)})
    except Exception:  # too large to serialize, or an output ORT cannot expose: constants alone decide
        return {}
    return dict(zip(names, values))


def float_nodes(proto: onnx.ModelProto) -> list[str]:
    """Compute nodes (MatMul/Gemm/Conv) that still compute in float after quantization: the second
    input is not an int8 weight (a float weight, or an activation: attention products), or the first
    is not dequantized (QDQ); in QOperator/dynamic graphs every MatMul/Gemm/Conv left is float."""
    inits = {t.name for t in proto.graph.initializer}
    dq = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    left = []
    for n in proto.graph.node:
        if n.op_type in COMPUTE_OPS and len(n.input) > 1 and (n.input[0] not in dq or dq.get(n.input[1]) not in inits):
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
