"""Compressing a sentence encoder: ONNX Runtime's transformer graph, int8, mixed precision, a distilled student.

- :func:`ort_transformer`: export to ONNX (parity-checked) and fuse the graph with ONNX Runtime's
  transformer optimizer (SkipLayerNormalization, BiasGelu; parity-checked again);
- :func:`int8`: dynamic or static, per-channel int8 in ONNX Runtime (on the fused graph) or torch;
- :func:`sensitivity` / :func:`mixed`: each Linear's fidelity cost when it alone is int8 (simulated
  in torch: per-channel weights, per-tensor dynamic activations), then dynamic int8 with the most
  sensitive layers kept in float until the mean cosine to the fp32 model drops at most ``max_drop`` points;
- :func:`distill_layers`: DistilBERT's recipe: a student with every other teacher layer, trained
  through ``fit`` on the teacher's embeddings of the built-in corpus (cosine + squared distance).

:func:`optimize_space` names these transforms and their combinations for an accuracy-aware search.
"""

from __future__ import annotations

import copy
import io
import logging
import tempfile
from collections.abc import Callable
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.quantize import quantize
from ..data import Split, Splits
from ..errors import ConfigError
from ..export import check_parity, to_onnx
from ..models.spec import derive, lineage_of, spec_of
from ..runtime import OnnxPredictor
from ..train import Batch, fit
from .fidelity import embed, fidelity
from .minilm import SentenceEncoder, drop_layers

BACKENDS = ("onnxruntime", "torch")
MODES = ("dynamic", "static")


def _encoder(model: nn.Module, who: str) -> SentenceEncoder:
    if not isinstance(model, SentenceEncoder):
        raise ConfigError(f"{who} takes a minilm sentence encoder (slimfuse.nlp.minilm()), got {type(model).__name__}")
    return model


def _ids(calib, who: str, samples: int) -> torch.Tensor:
    if isinstance(calib, Splits):
        calib = calib.val if len(calib.val) else calib.train
    x = calib.x if isinstance(calib, Split) else calib
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.is_floating_point():
        raise ConfigError(f"{who} needs token ids (Splits, a Split or an int64 tensor, sentences x length)")
    if len(x) == 0:
        raise ConfigError(f"{who}: no calibration sentences")
    return x[:samples]


def ort_transformer(model: nn.Module, sample, *, atol: float = 1e-4) -> OnnxPredictor:
    """``model`` exported to ONNX and fused by ONNX Runtime's BERT optimizer (parity-checked on ``sample``)."""
    from onnxruntime.transformers.optimizer import optimize_model

    enc = _encoder(model, "ort_transformer")
    x = _ids(sample, "ort_transformer", 64)
    src = to_onnx(enc, sample=x)
    layer = enc.layers[0]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="slimfuse-ort-") as tmp, redirect_stdout(io.StringIO()):
            path = Path(tmp) / "fp32.onnx"
            path.write_bytes(src.model_bytes())
            opt = optimize_model(str(path), model_type="bert", num_heads=layer.heads,
                                 hidden_size=layer.heads * layer.head_dim)
            fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
            data = opt.model.SerializeToString()
    finally:
        root.setLevel(level)
    pred = OnnxPredictor.from_bytes(data, where="optimized transformer graph")
    parity = check_parity(enc, pred, x, atol=atol, rtol=atol)
    return derive(src, pred, "ort_optimize", spec=spec_of(pred), fused=fused, parity=parity)


def int8(model: nn.Module, calib=None, *, backend: str = "onnxruntime", mode: str = "dynamic",
         exclude=(), samples: int = 256, graph: OnnxPredictor | None = None) -> nn.Module:
    """Per-channel int8 of a sentence encoder, ``dynamic`` (no calibration) or ``static`` (``calib``).

    ``onnxruntime``: on the fused transformer graph (``graph``: ``ort_transformer(model, ...)`` if
    already made; ``calib`` also gives the export's parity sample, so it is required);
    ``exclude``: Linear paths (``layers.5.ffn_out``) left in float (dynamic only).
    """
    enc = _encoder(model, "int8")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if mode not in MODES:
        raise ConfigError(f"unknown int8 mode {mode!r}; choose {', '.join(MODES)}")
    if exclude and mode == "static":
        raise ConfigError("exclude= (layers left in float) is supported for dynamic int8 only")
    if backend == "torch":
        if mode == "dynamic":
            return quantize(enc, "int8-dynamic", backend="torch", exclude=list(exclude))
        return quantize(enc, "int8-static", calib=_ids(calib, "int8 static", samples), backend="torch",
                        calibrator="percentile", samples=samples)
    x = _ids(calib, "int8 (onnxruntime)", samples)
    graph = graph or ort_transformer(enc, x)
    if mode == "dynamic":
        return quantize(graph, "int8-dynamic", backend="onnxruntime", exclude=[_node(p) for p in exclude])
    # weight MatMuls and the embedding Gather only: quantizing every op (the Add of the -10000 padding
    # mask, Softmax inputs, ...) gave mean cosine 0.48 on the corpus; these two 0.998
    return quantize(graph, "int8-static", calib=x, backend="onnxruntime", calibrator="percentile", samples=samples,
                    op_types=["MatMul", "Gather"])


def _node(path: str) -> str:
    """The ONNX MatMul node the TorchScript exporter names after the Linear at ``path``."""
    return "/" + path.replace(".", "/").replace("layers/", "layers.", 1) + "/MatMul"


def _linears(enc: SentenceEncoder) -> list[str]:
    return [p for p, m in enc.named_modules() if isinstance(m, nn.Linear)]


def _quant_input(_module, args):
    """Fake dynamic int8 of a Linear's input: per-tensor asymmetric uint8, range from this call."""
    x = args[0]
    lo, hi = x.min().clamp_max(0), x.max().clamp_min(0)
    scale = ((hi - lo) / 255).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    return (((torch.round(x / scale) + zero).clamp(0, 255) - zero) * scale,)


@contextmanager
def _simulated(sim: SentenceEncoder, paths):
    """``sim`` with its Linears at ``paths`` computing like dynamic int8 (per-channel symmetric int8
    weights, fake-quantized inputs) inside the block; restored after."""
    saved, hooks = {}, []
    try:
        for path in paths:
            layer = sim.get_submodule(path)
            w = layer.weight.detach()
            saved[path] = w.clone()
            scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
            w.copy_(torch.round(w / scale).clamp(-127, 127) * scale)
            hooks.append(layer.register_forward_pre_hook(_quant_input))
        yield sim
    finally:
        for h in hooks:
            h.remove()
        for path, w in saved.items():
            sim.get_submodule(path).weight.detach().copy_(w)


def sensitivity(model: nn.Module, calib, *, samples: int = 256) -> dict[str, float]:
    """Per Linear: the mean-cosine drop (to the fp32 model, on ``calib``) when it alone is dynamic int8."""
    enc = _encoder(model, "sensitivity")
    x = _ids(calib, "sensitivity", samples)
    ref = embed(enc, x)
    sim = copy.deepcopy(enc).eval()
    drops = {}
    for path in _linears(enc):
        with _simulated(sim, [path]):
            drops[path] = 1.0 - fidelity(ref, embed(sim, x))["mean_cosine"]
    return drops


def mixed(model: nn.Module, calib, *, max_drop: float = 0.5, backend: str = "onnxruntime",
          samples: int = 256, graph: OnnxPredictor | None = None) -> nn.Module:
    """Dynamic int8 with the most sensitive Linears kept in float: the fewest whose mean cosine to the fp32
    model drops at most ``max_drop`` points (0.5: mean cosine >= 0.995), the unit of every ``max_drop``.

    Layers are ranked by :func:`sensitivity`; the real int8 model is measured on ``calib`` after each
    layer kept, so the target is checked on the model returned, not on the simulation. ``graph``: the
    fused ONNX graph of ``model`` if already made (onnxruntime).
    """
    enc = _encoder(model, "mixed")
    if not (isinstance(max_drop, (int, float)) and 0 <= max_drop < 100):
        raise ConfigError(f"mixed: max_drop is in points of mean cosine (0.5: cosine >= 0.995), got {max_drop!r}")
    target = 1 - max_drop / 100
    x = _ids(calib, "mixed", samples)
    sens = sensitivity(enc, x)
    order = sorted(sens, key=sens.get, reverse=True)
    ref = embed(enc, x)
    if backend == "onnxruntime":
        graph = graph or ort_transformer(enc, x)
    for k in range(len(order) + 1):
        keep = order[:k]
        if backend == "onnxruntime":
            q = quantize(graph, "int8-dynamic", backend="onnxruntime", exclude=[_node(p) for p in keep])
        else:
            q = int8(enc, backend=backend, exclude=keep)
        achieved = fidelity(ref, embed(q, x))["mean_cosine"]
        if achieved >= target or k == len(order):
            break
    step = lineage_of(q)[-1]
    step["op"] = "mixed"
    step["params"].update(max_drop_points=max_drop, target=round(target, 6), achieved=round(achieved, 6), keep=keep,
                          sensitivity={p: round(v, 6) for p, v in sens.items()})
    q.slimfuse["lineage"][-1] = step  # one step, "mixed", instead of the quantize step it ran
    return q


def distill_layers(teacher: nn.Module, data: Splits, *, layers: int = 3, epochs: int = 4, lr: float = 1e-3,
                   batch_size: int = 32, seed: int = 0, train_embeddings: bool = False,
                   progress: bool | None = None) -> SentenceEncoder:
    """A ``layers``-layer student initialized from every other teacher layer, distilled on ``data.train``.

    Loss: ``1 - cos(student, teacher) + |student - teacher|^2`` per sentence on the (unit-length)
    embeddings. The embedding tables stay frozen unless ``train_embeddings`` (they are 12M of the
    22.7M parameters and the student shares the teacher's vocabulary).
    """
    enc = _encoder(teacher, "distill_layers")
    n = len(enc.layers)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers < n:
        raise ConfigError(f"distill_layers: layers must be an integer in 1..{n - 1}, got {layers!r}")
    if not isinstance(data, Splits):
        raise ConfigError("distill_layers needs Splits of token ids (e.g. slimfuse.data.load('sentences'))")
    if layers <= (n + 1) // 2:
        keep = list(range(0, n, 2))[:layers]  # DistilBERT: every other layer
    else:  # more than half the layers: spread them evenly, first and last included
        keep = [round(i * (n - 1) / (layers - 1)) for i in range(layers)]
    student = drop_layers(enc, keep)
    for name in ("word", "position", "token_type"):
        getattr(student, name).weight.requires_grad_(train_embeddings)
    targets = embed(enc, data.train.x)

    def loss(out: torch.Tensor, batch: Batch) -> torch.Tensor:
        t = targets[batch.index]
        return (1 - F.cosine_similarity(out, t, dim=1)).mean() + (out - t).pow(2).sum(1).mean()

    trained = fit(student, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, loss=loss,
                  schedule="cosine", progress=progress, op=None)
    for p in trained.parameters():
        p.requires_grad_(True)
    return derive(student, trained, "distill", loss="cosine+mse", epochs=epochs, lr=lr, seed=seed,
                  n_train=len(data.train), train_embeddings=train_embeddings)


Transform = Callable[[nn.Module], nn.Module]


def optimize_space(model: nn.Module, splits: Splits, *, seed: int = 0, max_drop: float = 0.5,
                   epochs: int = 4) -> list[tuple[str, Transform]]:
    """Named candidate transforms for an accuracy-aware search over a sentence encoder.

    Score them with ``fidelity_score(model)`` and metric ``mean_cosine``. The distilled student is
    trained once per source model and reused by the combinations.
    """
    _encoder(model, "optimize_space")
    students: dict[int, nn.Module] = {}

    def student(m: nn.Module) -> nn.Module:
        if id(m) not in students:
            students[id(m)] = distill_layers(m, splits, epochs=epochs, seed=seed)
        return students[id(m)]

    target = f"cos>={1 - max_drop / 100:g}"
    return [
        ("onnxruntime fp32", lambda m: ort_transformer(m, splits)),
        ("onnxruntime int8-dynamic", lambda m: int8(m, splits)),
        ("onnxruntime int8-static", lambda m: int8(m, splits, mode="static")),
        (f"onnxruntime mixed ({target})", lambda m: mixed(m, splits, max_drop=max_drop)),
        ("torch int8-dynamic", lambda m: int8(m, backend="torch")),
        ("torch int8-static", lambda m: int8(m, splits, backend="torch", mode="static")),
        (f"torch mixed ({target})", lambda m: mixed(m, splits, max_drop=max_drop, backend="torch")),
        ("distill 3 layers", student),
        ("distill 3 layers + onnxruntime int8-dynamic", lambda m: int8(student(m), splits)),
        (f"distill 3 layers + onnxruntime mixed ({target})", lambda m: mixed(student(m), splits, max_drop=max_drop)),
    ]
