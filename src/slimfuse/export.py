"""``slimfuse.export(model, "onnx", path)``: one ONNX file, checked and parity-tested.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) writes the
model with a dynamic batch axis and its weights embedded; ``onnx.checker``
validates the result, and ONNX Runtime's outputs are compared with torch's on
sample data (max abs difference, argmax agreement). A disagreement beyond the
tolerance is an error, never a silently wrong file. The parity is returned and
recorded in the lineage (so in the ONNX metadata and in any card saved later).
Files are written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from . import configs
from .data import Split
from .data.feed import feed
from .errors import ArtifactError, ConfigError
from .models import hf
from .models.artifact import write_bytes_atomic
from .models.calling import forward, select, selector
from .models.keras import torch_of
from .models.spec import derive, spec_of, task_of
from .runtime import OnnxPredictor, from_proto, load_onnx, parse_onnx, write_metadata
from .train import predict, probe


@dataclass(frozen=True)
class ExportResult:
    path: Path
    bytes: int
    parity: dict | None  # {"max_abs_diff", "argmax_agreement", "samples"}; None when the source was ONNX already


def export(model: nn.Module, format: str, path: str | Path, *, sample=None, opset: int = 17,
           atol: float = 1e-4, rtol: float = 1e-4) -> ExportResult:
    """Write ``model`` as a single ``.onnx`` file at ``path`` (atomically) and return its parity with torch.

    ``model``: a torch module, or an :class:`~slimfuse.runtime.OnnxPredictor` (e.g. an int8 model
    from ONNX Runtime quantization), whose ONNX bytes are written with slimfuse's metadata.
    ``sample``: inputs for the parity check (a ``Split``, tensor or array); by default 64 uniform
    random inputs shaped like the model's task. The export fails with ArtifactError when ONNX
    Runtime's logits differ from torch's by more than ``atol + rtol * max|logits|``.
    """
    model = torch_of(model)
    configs.Export.build(format=format, opset=opset, atol=atol, rtol=rtol)  # one set of names and bounds
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the path of the .onnx file to write")
    pred = to_onnx(model, sample=sample, opset=opset, atol=atol, rtol=rtol)
    proto = onnx.ModelProto()
    proto.CopyFrom(pred.proto)
    write_metadata(proto, pred)
    data = proto.SerializeToString()
    write_bytes_atomic(path, data)
    parity = pred.slimfuse["lineage"][-1]["params"].get("parity") if pred is not model else None
    return ExportResult(path=path, bytes=len(data), parity=parity)


def to_onnx(model, *, sample=None, opset: int = 17, atol: float = 1e-4, rtol: float = 1e-4) -> OnnxPredictor:
    """``model`` as an :class:`OnnxPredictor` (in memory).

    A predictor is returned as is; an ``onnx.ModelProto`` or a path to an ``.onnx`` file is checked
    and wrapped; a torch module is exported and parity-checked, recording an ``export`` step.
    """
    model = torch_of(model)
    if isinstance(model, OnnxPredictor):
        return model
    if isinstance(model, (str, Path)):
        return load_onnx(model)
    if isinstance(model, onnx.ModelProto):
        pred = from_proto(model)
        return derive(pred, pred, "import_onnx", producer=model.producer_name or None)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"cannot export a {type(model).__name__}; give a torch module or an ONNX model")
    x = sample_inputs(model, sample)
    probe(model, x)  # a model that cannot take these inputs, or returns no single tensor: one clear error
    own = getattr(model, "slimfuse_onnx", None)  # a model that is ONNX already (an ensemble of ONNX members)
    graph = own() if callable(own) else None
    if graph is not None:
        proto, options = graph
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    elif any(isinstance(m, OnnxPredictor) for m in model.modules()):  # torch cannot trace into a session
        raise ConfigError(
            "this model runs ONNX Runtime sessions inside (ONNX members of an ensemble), which torch cannot "
            "export; an ensemble whose members are all ONNX models (mean, weighted or mean-logits; one input "
            "each, the same input layout, dtype, opset and class count) is written as one graph")
    else:
        proto, options = torch_to_proto(model, x[:2], opset=opset), {}
    pred = from_proto(proto, model, **options)
    parity = check_parity(model, pred, x, atol=atol, rtol=rtol)
    return derive(model, pred, "export", spec=spec_of(pred), format="onnx", opset=opset, parity=parity)


def torch_to_proto(model: nn.Module, example: torch.Tensor, *, opset: int = 17) -> onnx.ModelProto:
    """Export with the TorchScript exporter: dynamic batch axis, weights embedded, checked."""
    net = copy.deepcopy(model).eval()  # never touch the caller's module (train/eval flag included)
    if hf.is_hf(net):
        net = _TokensIn(net) if not example.is_floating_point() else net
    buf = io.BytesIO()
    axes = {0: "batch"}
    if not example.is_floating_point() and example.ndim == 2:  # token ids: any sequence length
        axes[1] = "sequence"
    try:
        with warnings.catch_warnings(), torch.no_grad(), _mha_fastpath_off():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (example,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": axes, "logits": {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as e:  # the exporter's errors are many kinds; all mean "this module cannot be exported"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot export this model to ONNX: {first}") from None
    return parse_onnx(buf.getvalue(), where="exported model")


class _TokensIn(nn.Module):
    """A ``transformers`` model as the exporter sees it: token ids in with an all-ones attention mask (what
    no mask means: a decoder without one takes a packed-sequence detection path, ``aten::diff``, that ONNX
    lacks), no key/value cache, the selected logits out."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        if getattr(net.config, "use_cache", False):
            net.config.use_cache = False  # a decoder's cache (GPT-2) is no graph output

    def forward(self, ids):
        import inspect

        if "attention_mask" not in inspect.signature(self.net.forward).parameters:
            return forward(self.net, ids)
        return select(self.net(input_ids=ids, attention_mask=torch.ones_like(ids)), selector(self.net))


@contextlib.contextmanager
def _mha_fastpath_off():
    """``nn.MultiheadAttention`` in eval mode without grad takes a fused fast path
    (``aten::_native_multi_head_attention``) that has no ONNX symbolic; export the plain path instead."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def sample_inputs(model: nn.Module, sample=None, *, n: int = 64) -> torch.Tensor:
    """Inputs for parity checks: ``sample`` as a float tensor (integer token ids stay int64), or uniform
    noise shaped like the task. ``sample`` may be a Split, a tensor, an array, or any data
    :func:`slimfuse.data.feed.feed` reads (a DataLoader ...: its first 256 samples, labels ignored)."""
    if isinstance(sample, Split):
        return sample.x[:256]
    if isinstance(sample, np.ndarray):
        dtype = np.int64 if np.issubdtype(sample.dtype, np.integer) else np.float32
        return torch.from_numpy(np.ascontiguousarray(sample, dtype=dtype))[:256]
    if isinstance(sample, torch.Tensor):
        return (sample.long() if not sample.is_floating_point() else sample.float())[:256]
    if sample is not None:
        x = feed(sample, labels=None, where="the export sample").head(256).x
        if not isinstance(x, torch.Tensor):
            raise ConfigError("ONNX export takes one input tensor; this sample's batches hold several inputs or "
                              "keyword inputs")
        return sample_inputs(model, x)
    shape = input_shape(model)
    if shape is None:
        raise ConfigError("cannot tell this model's input shape; pass sample=(a few inputs, e.g. data.val)")
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, *shape, generator=gen)


def input_shape(model: nn.Module) -> list[int] | None:
    """One sample's input shape, from the model's task or its zoo spec (None if unknown)."""
    task = task_of(model)
    if task and task.get("input_shape"):
        return list(task["input_shape"])
    spec = spec_of(model) or {}
    args = spec.get("args", {})
    if spec.get("arch") == "mlp":
        return [args["in_features"]]
    if spec.get("arch") in ("lenet5", "cnn"):
        return [args.get("in_channels", 1), args.get("image_size", 28), args.get("image_size", 28)]
    return None


def check_parity(reference: nn.Module, candidate: nn.Module, x: torch.Tensor, *, atol: float, rtol: float) -> dict:
    """Compare two modules' logits on ``x``; raise ArtifactError beyond ``atol + rtol * max|ref|``."""
    ref, got = predict(reference, x), predict(candidate, x)
    if ref.shape != got.shape:
        raise ArtifactError(f"the ONNX model outputs shape {tuple(got.shape)}, torch {tuple(ref.shape)}")
    diff = float((ref - got).abs().max()) if ref.numel() else 0.0
    agree = float((ref.argmax(-1) == got.argmax(-1)).float().mean()) if ref.numel() else 1.0
    parity = {"max_abs_diff": diff, "argmax_agreement": agree, "samples": len(x)}
    limit = atol + rtol * float(ref.abs().max() if ref.numel() else 0.0)
    if not diff <= limit:
        raise ArtifactError(f"ONNX Runtime disagrees with torch: max abs difference {diff:.3g} > {limit:.3g} "
                            f"(argmax agreement {agree:.4f}); not exported")
    return parity

