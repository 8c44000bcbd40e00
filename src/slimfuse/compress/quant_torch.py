"""The torch backend of ``slimfuse.quantize``: int8-dynamic, int8-static, qat, fp16, bf16, mixed.

How a model becomes int8 is a *layer plan*: for every layer, its precision and, for
int8 layers, the ReLU fused into it, the BatchNorm folded into it, and whether it
quantizes its input / dequantizes its output (the edges of a quantized region: in an
``nn.Sequential``, consecutive int8 layers pass uint8 tensors to each other through
ReLU, pooling, flatten and dropout). The plan is JSON and goes into the card's spec
(architecture ``"quantized"``): loading rebuilds the source architecture, applies the
plan and loads the int8 tensors, never unpickling anything.

Layers a scheme has no kernel for stay in float and are listed in the plan with the
reason (``model.layers``, the card's spec and lineage step).

fp16 / bf16 store every float tensor in 2 bytes. Where the CPU computes the format natively
(``slimfuse.hardware()``: AMX-BF16 / AVX-512 BF16 for bf16, AMX-FP16 / AVX512-FP16 for fp16) the
model also *runs* in it (``compute="auto"``: a :class:`HalfModel`, architecture ``half``, casting
float inputs to the format and outputs back to float32) — when calibration data is given, only if a
batch of it runs faster that way than in float32 on this machine (timed, interleaved; the times go
into ``compute``); elsewhere it computes in float32 with the
weights rounded (the ``half`` codec stores them in 2 bytes), because eager half-precision matmuls
measured 13-50x slower than fp32 on CPUs without those units (BENCHMARKS.md). The lineage step and
the layer precisions say which (``compute``).
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..checkpoint import Resume
from ..data import Split, Splits
from ..data.feed import n_samples, take
from ..errors import ArtifactError, ConfigError
from ..measure import artifact_bytes
from ..models.artifact import register_codec
from ..models.calling import forward
from ..models.spec import derive, spec_of, task_of
from ..models.zoo import build, register
from ..train import evaluate, fit
from .calibrate import check_calibrator, observe
from .qmodules import FakeQuant, QConv2d, QLinear, _Int8Layer, missing_kernels, no_kernels_message
from .schemes import register_scheme

# run in float on quantized and float tensors alike: they never end a quantized region
TRANSPARENT = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
INT8 = ("int8-dynamic", "int8-static")
INT8_SCHEMES = (*INT8, "qat", "mixed")  # the schemes that run torch's int8 kernels (mixed: to measure layers)
TIMING_BATCH = 256  # fp16/bf16 compute="auto" with data: the batch both ways of computing are timed at


# ---------------------------------------------------------------------------------------------
# the layer plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Group:
    """An int8 layer: the Linear/Conv2d at ``path``, the BatchNorm folded in, the ReLU fused in."""

    path: str
    op: str
    bn: str | None = None
    relu: str | None = None
    quant_input: bool = True
    dequant_output: bool = True

    @property
    def last(self) -> str:
        return self.relu or self.bn or self.path


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _conv_ok(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple)


def _kernel_for(scheme: str, m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return True
    return scheme != "int8-dynamic" and _conv_ok(m)


def find_groups(model: nn.Module, scheme: str, keep: set[str] = frozenset(),
                chains: dict[str, tuple[str | None, str | None]] | None = None) -> list[Group]:
    """Plan the int8 layers of ``model`` (layers in ``keep`` stay float). Inside ``nn.Sequential`` the
    BatchNorm and ReLU after a layer are read off the order of its children; elsewhere from ``chains``
    (layer path -> (BatchNorm, ReLU)), as :func:`graph_chains` finds them."""
    groups: list[Group] = []
    chains = chains or {}

    def quantizable(path, m):
        return path not in keep and _kernel_for(scheme, m)

    def walk(mod: nn.Module, prefix: str):
        if isinstance(mod, nn.Sequential):
            return walk_seq(mod, prefix)
        for name, child in mod.named_children():
            path = _join(prefix, name)
            if quantizable(path, child):
                bn, relu = chains.get(path, (None, None))
                groups.append(Group(path, type(child).__name__, bn=bn, relu=relu))
            else:
                walk(child, path)

    def walk_seq(seq: nn.Sequential, prefix: str):
        items = [(_join(prefix, n), c) for n, c in seq.named_children()]
        live: Group | None = None  # the int8 layer whose uint8 output is flowing
        i = 0
        while i < len(items):
            path, child = items[i]
            if quantizable(path, child):
                g = Group(path, type(child).__name__, quant_input=live is None, dequant_output=False)
                j = i + 1
                if g.op == "Conv2d" and j < len(items) and _folds(child, items[j][1]):
                    g.bn, j = items[j][0], j + 1
                if j < len(items) and type(items[j][1]) is nn.ReLU:
                    g.relu, j = items[j][0], j + 1
                if scheme == "int8-dynamic":
                    g.quant_input = g.dequant_output = True
                else:
                    live = g
                groups.append(g)
                i = j
                continue
            if not isinstance(child, TRANSPARENT):
                if live is not None:
                    live.dequant_output, live = True, None
                walk(child, path)
            i += 1
        if live is not None:
            live.dequant_output = True

    walk(model, "")
    return groups


def graph_chains(model: nn.Module, x) -> dict[str, tuple[str | None, str | None]]:
    """Conv2d -> BatchNorm2d (-> ReLU) and Linear/Conv2d -> ReLU chains of a model's forward code.

    Read off one forward pass on (the first rows of) ``x``: a BatchNorm or ReLU module whose input
    is the very tensor a layer returned, each module called once. A chain is kept only if folding
    it reproduces the model's outputs on ``x`` (a layer output also used elsewhere, e.g. by a
    residual addition, would not), so a wrong guess costs speed, never correctness.
    """
    x = take(x, slice(0, 8)) if not isinstance(x, torch.Tensor) else x[:8]
    names = {id(m): n for n, m in model.named_modules() if n}
    calls: list[tuple[str, nn.Module, object, object]] = []  # (path, module, input, output); tensors kept alive
    hooks = [m.register_forward_hook(lambda mod, i, o: calls.append((names[id(mod)], mod, i[0] if i else None, o)))
             for m in {id(m): m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d,
                                                                     nn.ReLU) and id(m) in names}.values()]
    try:
        with torch.no_grad():
            reference = forward(model, x)
    except (RuntimeError, TypeError, ValueError):  # calibration reports the model's own failure
        return {}
    finally:
        for h in hooks:
            h.remove()
    counts: dict[str, int] = {}
    for path, *_ in calls:
        counts[path] = counts.get(path, 0) + 1

    def consumer(after: int, tensor, kinds: tuple) -> tuple[int, str, nn.Module] | None:
        for k in range(after + 1, len(calls)):
            path, mod, inp, _ = calls[k]
            if inp is tensor:
                return (k, path, mod) if type(mod) in kinds and counts[path] == 1 else None
        return None

    found: dict[str, tuple[str | None, str | None]] = {}
    for i, (path, mod, _, out) in enumerate(calls):
        if type(mod) not in (nn.Conv2d, nn.Linear) or counts[path] != 1 or not isinstance(out, torch.Tensor):
            continue
        bn = relu = None
        at, tensor = i, out
        nxt = consumer(i, out, (nn.BatchNorm2d,)) if type(mod) is nn.Conv2d else None
        if nxt is not None and _folds(mod, nxt[2]):
            at, bn, tensor = nxt[0], nxt[1], calls[nxt[0]][3]
        nxt = consumer(at, tensor, (nn.ReLU,))
        if nxt is not None:
            relu = nxt[1]
        if bn or relu:
            found[path] = (bn, relu)

    def reproduces(chosen: dict) -> bool:
        trial = copy.deepcopy(model).eval()
        for path, (bn, relu) in chosen.items():
            parts = [trial.get_submodule(p) for p in (path, bn, relu) if p is not None]
            for p in (bn, relu):
                if p is not None:
                    trial.set_submodule(p, nn.Identity())
            trial.set_submodule(path, _Chain(*parts))
        try:
            with torch.no_grad():
                got = forward(trial, x)
        except (AttributeError, RuntimeError, TypeError):  # forward code that needs the layer itself: not folded
            return False
        return got.shape == reference.shape and bool(torch.allclose(got, reference, rtol=1e-5, atol=1e-6))

    if not found or reproduces(found):
        return found
    kept = {}
    for path, (bn, relu) in found.items():  # one by one; a ReLU that follows an in-place addition is not the chain's
        for chain in ((bn, relu), (bn, None)):
            if (chain[0] or chain[1]) and reproduces({path: chain}):
                kept[path] = chain
                break
    return kept if reproduces(kept) else {}


class _Chain(nn.Sequential):
    """A layer followed by its BatchNorm / ReLU, standing in for the layer while a fold is tried; it answers for
    the layer's attributes (``stride``, ``kernel_size`` ...), as the int8 layer replacing it does, because forward
    code reads them (transformers' MobileNetV2 pads by ``convolution.stride``)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            layers = self.__dict__.get("_modules") or {}
            if name.startswith("_") or not layers:
                raise
            return getattr(next(iter(layers.values())), name)


def _folds(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


def _float_reason(scheme: str, m: nn.Module) -> str:
    kind = type(m).__name__
    if scheme == "int8-dynamic" and isinstance(m, nn.Conv2d):
        return "Conv2d: torch has dynamic int8 kernels for Linear only; kept fp32"
    if isinstance(m, nn.Conv2d):
        return f"Conv2d with padding_mode={m.padding_mode!r}: no int8 kernel; kept fp32"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return f"{kind}: not folded into an int8 Conv2d; kept fp32"
    return f"{kind}: no int8 kernel in this scheme; kept fp32"


def layer_plan(model: nn.Module, scheme: str, groups: list[Group], keep: dict[str, str] | None = None) -> dict:
    """JSON plan: int8 groups plus every other layer holding weights, with its precision and why."""
    plan: dict[str, dict] = {}
    covered = set()
    for g in groups:
        plan[g.path] = {"precision": scheme, "op": g.op, "bn": g.bn, "relu": g.relu,
                        "quant_input": g.quant_input, "dequant_output": g.dequant_output}
        covered |= {g.path, g.bn}
    for path, m in model.named_modules():
        if path in covered or not any(True for _ in m.parameters(recurse=False)):
            continue
        if keep and path in keep:
            plan[path] = {"precision": keep[path], "op": type(m).__name__, "reason": "kept for accuracy (sensitivity)"}
        else:
            plan[path] = {"precision": "fp32", "op": type(m).__name__, "reason": _float_reason(scheme, m)}
    return plan


def apply_plan(net: nn.Module, plan: dict) -> nn.Module:
    """Swap the planned layers of ``net`` (in place) for empty int8 layers; fused/folded ones become Identity."""
    for path, entry in plan.items():
        if entry["precision"] not in INT8:
            continue
        src = net.get_submodule(path)
        flags = {"relu": entry["relu"] is not None, "quant_input": entry["quant_input"],
                 "dequant_output": entry["dequant_output"], "mode": entry["precision"].removeprefix("int8-")}
        bias = src.bias is not None or entry["bn"] is not None
        net.set_submodule(path, (QLinear if entry["op"] == "Linear" else QConv2d).like(src, bias=bias, **flags))
        for other in (entry["bn"], entry["relu"]):
            if other is not None:
                net.set_submodule(other, nn.Identity())
    return net


class QuantizedModel(nn.Module):
    """A quantized network (``net``) and its layer plan; what ``slimfuse.quantize`` returns."""

    def __init__(self, net: nn.Module, scheme: str, plan: dict):
        super().__init__()
        self.net, self.scheme, self.layers = net, scheme, plan
        self._macs, self._input_shape = None, None

    def train(self, mode: bool = True):
        """An int8 network has no training mode (dropout stays off), so it can serve as a teacher or member."""
        self.training = mode
        self.net.eval()
        return self

    def forward(self, x=None, *args, **kwargs):
        if self._input_shape is None and isinstance(x, torch.Tensor) and not args and not kwargs:
            self._input_shape = tuple(x.shape[1:])
        if x is None:  # keyword inputs only (a Hugging Face model's input_ids=..., attention_mask=...)
            return self.net(*args, **kwargs)
        return self.net(x, *args, **kwargs)

    @property
    def precision(self) -> dict[str, str]:
        """Each weight-holding layer's precision, e.g. ``{"fc1": "int8-static", "conv1": "fp32"}``."""
        return {path: entry["precision"] for path, entry in self.layers.items()}

    def float_equivalent(self) -> nn.Module:
        """A float copy computing with the dequantized weights (for counting MACs, debugging)."""
        net = copy.deepcopy(self.net)
        for path, m in list(net.named_modules()):
            if isinstance(m, _Int8Layer):
                net.set_submodule(path, m.to_float())
        return net

    def slimfuse_counts(self) -> dict[str, int]:
        total = {"params": 0, "nonzeros": 0}
        for m in self.net.modules():
            if isinstance(m, _Int8Layer):
                c = m.counts()
            else:
                ps = list(m.parameters(recurse=False))
                c = {"params": sum(p.numel() for p in ps), "nonzeros": sum(int(torch.count_nonzero(p)) for p in ps)}
            total = {k: total[k] + c[k] for k in total}
        return total

    def slimfuse_macs(self) -> int | None:
        """MACs of one sample (the float equivalent's, counted on the shape of the inputs seen)."""
        task = task_of(self) or {}
        shape = self._input_shape or task.get("input_shape")
        if self._macs is None and shape:
            try:
                with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                    self.float_equivalent().eval()(torch.zeros(1, *shape))
                self._macs = counter.get_total_flops() // 2
            except Exception:  # an op the counter cannot trace
                return None
        return self._macs


@register("quantized")
def quantized(base: dict, scheme: str, layers: dict) -> QuantizedModel:
    """Architecture of a quantized model: the ``base`` architecture with the layer plan applied."""
    missing = missing_kernels()
    if missing and any(isinstance(e, dict) and e.get("precision") in INT8 for e in layers.values()):
        raise ArtifactError(f"cannot load this torch-int8 artifact: {no_kernels_message(missing)}")
    return QuantizedModel(apply_plan(build(base), layers), scheme, layers)


def _scheme(name: str):
    """Register ``fn`` as the torch backend of scheme ``name``; bad options become one ConfigError."""

    def deco(fn):
        sig = inspect.signature(fn)
        options = [p for p in sig.parameters if p not in ("model", "arg", "calib")]

        @functools.wraps(fn)
        def checked(model, *, arg=None, **kwargs):
            missing = missing_kernels() if name in INT8_SCHEMES else []
            if missing:
                raise ConfigError(f"{name}: {no_kernels_message(missing)}")
            if arg is not None:
                raise ConfigError(f"scheme {name!r} takes no parameter, got {name}:{arg}")
            try:
                sig.bind(model, **kwargs)
            except TypeError as e:
                raise ConfigError(f"{name}: {e} (its options: {', '.join(options) or 'none'})") from None
            return fn(model, **kwargs)

        return register_scheme(name, "torch")(checked)

    return deco


# ---------------------------------------------------------------------------------------------
# building int8 models
# ---------------------------------------------------------------------------------------------
def _folded(net: nn.Module, g: Group) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of ``g``'s layer with its BatchNorm (eval statistics) folded in."""
    layer = net.get_submodule(g.path)
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    if g.bn is None:
        return w, b
    bn = net.get_submodule(g.bn)
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_var)
    k = gamma / torch.sqrt(bn.running_var + bn.eps)
    b = beta + ((b if b is not None else 0.0) - bn.running_mean) * k
    return w * k.view(-1, 1, 1, 1), b


def _convert(source: nn.Module, scheme: str, plan: dict, weights: dict, ranges: dict | None) -> QuantizedModel:
    net = apply_plan(copy.deepcopy(source).eval(), plan)
    for path, entry in plan.items():
        if entry["precision"] in INT8:
            q = net.get_submodule(path)
            q.set_weight(*weights[path])
            if entry["precision"] == "int8-static":
                q.set_ranges(ranges.get(f"{path}:in"), ranges[f"{path}:out"])
    return QuantizedModel(net, scheme, plan).eval()


def _points(groups: list[Group]) -> dict[str, tuple[str, str]]:
    points = {}
    for g in groups:
        points[f"{g.path}:in"] = (g.path, "input")
        points[f"{g.path}:out"] = (g.last, "output")
    return points


def _calib_x(calib, scheme: str, samples: int, seed: int = 0) -> torch.Tensor:
    if calib is None:
        raise ConfigError(
            f"{scheme} needs calibration data to set its activation ranges: pass calib= (Splits, a Split or a "
            "tensor of inputs; CLI: --data)"
        )
    if isinstance(calib, Splits):
        calib = calib.train
    if isinstance(calib, Split):
        x = calib.x
        if not isinstance(x, torch.Tensor):  # several or keyword inputs (data/feed.py)
            n = n_samples(x)
            if n == 0:
                raise ConfigError(f"{scheme}: the calibration data is empty")
            if n > samples:
                x = take(x, torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples])
            return x
    elif isinstance(calib, (torch.Tensor, np.ndarray)) and calib.ndim >= 2:
        x = torch.as_tensor(calib, dtype=torch.float32)
    else:
        raise ConfigError(f"{scheme}: calib= must be Splits, a Split or an array of inputs, got {type(calib).__name__}")
    if len(x) == 0:
        raise ConfigError(f"{scheme}: the calibration data is empty")
    if len(x) > samples:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:samples]]
    return x


def _finish(source: nn.Module, result: nn.Module, scheme: str, plan: dict, **params) -> nn.Module:
    base = spec_of(source)
    spec = {"arch": "quantized", "args": {"base": base, "scheme": scheme, "layers": plan}} if base else None
    precision = {p: e["precision"] for p, e in plan.items()}
    floats = {p: e["reason"] for p, e in plan.items() if e["precision"] not in INT8 and "reason" in e}
    return derive(source, result, "quantize", spec=spec, scheme=scheme, precision=precision,
                  float_layers=floats or None, **params)


def _check_source(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize takes a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, (_Int8Layer, QuantizedModel, HalfModel)) for m in model.modules()):
        raise ConfigError("this model is already quantized; quantize its float source instead")


def _groups(source: nn.Module, scheme: str, kernel_scheme: str, x=None) -> list[Group]:
    groups = find_groups(source, kernel_scheme, chains=graph_chains(source, x) if x is not None else None)
    if not groups:
        kinds = "Linear" if kernel_scheme == "int8-dynamic" else "Linear or Conv2d"
        raise ConfigError(f"{scheme}: the model has no layer it can quantize ({kinds}); nothing would change")
    return groups


def _calibrated(model, calib, scheme, *, calibrator, samples, percentile=99.99, seed=0):
    check_calibrator(calibrator)
    x = _calib_x(calib, scheme, samples, seed)
    source = copy.deepcopy(model).eval()
    groups = _groups(source, scheme, "int8-static", x)
    ranges = observe(source, _points(groups), x, calibrator=calibrator, percentile=percentile)
    return source, groups, ranges, n_samples(x)


def _static(source, groups, ranges, keep: dict[str, str] | None = None, scheme="int8-static") -> QuantizedModel:
    chosen = find_groups(source, "int8-static", set(keep or ()), chains={g.path: (g.bn, g.relu) for g in groups})
    by_path = {g.path: g for g in groups}
    weights = {g.path: _folded(source, by_path[g.path]) for g in chosen}
    return _convert(source, scheme, layer_plan(source, "int8-static", chosen, keep), weights, ranges)


@_scheme("int8-dynamic")
def int8_dynamic(model: nn.Module, *, calib=None, exclude=None) -> nn.Module:
    """Int8 weights; activations quantized per call (fbgemm ``linear_dynamic``). Linear layers only.

    ``exclude``: paths of layers to leave in fp32 (mixed precision chosen by the caller).
    """
    _check_source(model)
    source = copy.deepcopy(model).eval()
    keep = sorted(exclude or ())
    modules = dict(source.named_modules())
    unknown = [p for p in keep if not isinstance(modules.get(p), nn.Linear)]
    if unknown:
        raise ConfigError(f"int8-dynamic: exclude names no Linear layer of this model: {', '.join(map(str, unknown))}")
    groups = _groups(source, "int8-dynamic", "int8-dynamic",
                     _calib_x(calib, "int8-dynamic", 64) if calib is not None else None)
    chosen = [g for g in groups if g.path not in keep]
    plan = layer_plan(source, "int8-dynamic", chosen, dict.fromkeys(keep, "fp32"))
    weights = {g.path: _folded(source, g) for g in chosen}
    result = _finish(model, _convert(source, "int8-dynamic", plan, weights, None), "int8-dynamic", plan)
    before, after = artifact_bytes(model), artifact_bytes(result)
    if after >= before:  # a CNN: its Linear layers hold little of the weights, the layer plan adds bytes
        linear = sum(source.get_submodule(g.path).weight.numel() for g in chosen)
        total = sum(p.numel() for p in source.parameters())
        raise ConfigError(f"int8-dynamic: torch has dynamic int8 kernels for Linear layers only, which hold "
                          f"{100 * linear / max(total, 1):.1f}% of this model's weights, so the result would not be "
                          f"smaller ({after:,} bytes against {before:,}); use int8-static (Conv2d too), "
                          "backend='onnxruntime' (dynamic int8 convolutions) or fp16/bf16")
    return result


@_scheme("int8-static")
def int8_static(model: nn.Module, *, calib=None, calibrator: str = "percentile", samples: int = 512,
                percentile: float = 99.99, seed: int = 0) -> nn.Module:
    """Int8 weights (per channel) and activations (calibrated); Linear and Conv2d, BatchNorm folded, ReLU fused."""
    _check_source(model)
    source, groups, ranges, n = _calibrated(model, calib, "int8-static", calibrator=calibrator,
                                            samples=samples, percentile=percentile, seed=seed)
    q = _static(source, groups, ranges)
    return _finish(model, q, "int8-static", q.layers, calibrator=calibrator, samples=n)


@_scheme("qat")
def qat(model: nn.Module, *, calib=None, epochs: int = 3, lr: float = 1e-4, batch_size: int = 64,
        samples: int = 512, seed: int = 0, progress: bool | None = None,
        checkpoint: str | Path | None = None, device: str | torch.device | None = "cpu", data=None) -> nn.Module:
    """Quantization-aware fine-tuning (fake-quant through ``fit``), then a real int8-static model.

    ``checkpoint`` (a folder): the fine-tuning is checkpointed there every epoch and a rerun with
    the same arguments resumes from it (see :func:`slimfuse.fit`); removed when done. ``device``: where
    the fine-tuning runs (:func:`slimfuse.devices.resolve`); the int8 model runs on the CPU. ``data``: the
    training data when ``calib`` is only a sample of it (``quantize`` passes a streamed source here and its
    first samples as ``calib``)."""
    _check_source(model)
    train = calib if isinstance(calib, Splits) else data
    if train is None:
        raise ConfigError("qat fine-tunes the model, so it needs training data: the data set's Splits or a "
                          "DataLoader of labelled batches as calib= (CLI: --data)")
    source, groups, ranges, _ = _calibrated(model, calib, "qat", calibrator="minmax", samples=samples,
                                         seed=seed)
    fq = copy.deepcopy(source)
    for g in groups:
        w, b = _folded(source, g)
        layer = copy.deepcopy(source.get_submodule(g.path))
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None and layer.bias is None:
                layer.bias = nn.Parameter(b.clone())
            elif b is not None:
                layer.bias.copy_(b)
        fq.set_submodule(g.path, FakeQuant(layer, relu=g.relu is not None, quant_input=g.quant_input,
                                           input_range=ranges[f"{g.path}:in"], output_range=ranges[f"{g.path}:out"]))
        for other in (g.bn, g.relu):
            if other is not None:
                fq.set_submodule(other, nn.Identity())
    resume = None if checkpoint is None else Resume(checkpoint, key={"op": "qat", "samples": samples})
    trained = fit(fq, train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress, op=None,
                  checkpoint=resume, device=device)
    weights, trained_ranges = {}, {}
    for g in groups:
        m = trained.get_submodule(g.path)
        weights[g.path] = (m.layer.weight.detach(), None if m.layer.bias is None else m.layer.bias.detach())
        trained_ranges[f"{g.path}:in"], trained_ranges[f"{g.path}:out"] = m.ranges()
    plan = layer_plan(source, "int8-static", groups)
    q = _convert(source, "qat", plan, weights, trained_ranges)
    return _finish(model, q, "qat", plan, epochs=epochs, lr=lr)


# ---------------------------------------------------------------------------------------------
# half precision storage
# ---------------------------------------------------------------------------------------------
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _round_half(model: nn.Module, dtype: torch.dtype, only: set[str] | None = None) -> nn.Module:
    """Round float parameters and buffers to ``dtype`` in place (kept as float32 for compute)."""
    for path, m in model.named_modules():
        if only is not None and path not in only:
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is not None and t.dtype == torch.float32 and not isinstance(m, _Int8Layer):
                with torch.no_grad():
                    t.copy_(t.to(dtype).float())
    return model


class HalfModel(nn.Module):
    """``net`` computed in ``dtype`` (float16 or bfloat16): float inputs are cast to it, float outputs back
    to float32, so callers see a float32 model. What the fp16/bf16 schemes return where the CPU computes
    the format natively."""

    def __init__(self, net: nn.Module, dtype: str):
        super().__init__()
        if dtype not in ("float16", "bfloat16"):
            raise ConfigError(f"half: dtype must be float16 or bfloat16, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        self.net = net.to(self.dtype).eval()

    def train(self, mode: bool = True):
        """Half-precision weights are for inference: the network stays in eval mode (dropout off)."""
        self.training = mode
        self.net.eval()
        return self

    def forward(self, *args, **kwargs):
        def cast(a):
            return a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a

        out = self.net(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out


@register("half")
def half(base: dict, dtype: str) -> HalfModel:
    """Architecture of a model computed in half precision: the ``base`` architecture cast to ``dtype``."""
    return HalfModel(build(base), dtype)


COMPUTE = ("auto", "half", "fp32")


def _half(model: nn.Module, scheme: str, compute: str = "auto", calib=None) -> nn.Module:
    from ..hardware import computes

    _check_source(model)
    if compute not in COMPUTE:
        raise ConfigError(f"{scheme}: compute must be one of {', '.join(COMPUTE)}, got {compute!r}")
    native = computes(scheme)
    dtype = HALF[scheme]
    base = spec_of(model)
    half_spec = {"arch": "half", "args": {"base": base, "dtype": str(dtype).removeprefix("torch.")}} if base else None
    rounded = _round_half(copy.deepcopy(model).eval(), dtype)
    if compute == "half" or (compute == "auto" and native):
        spec, out = half_spec, HalfModel(copy.deepcopy(model).eval(), str(dtype).removeprefix("torch."))
        how = scheme if native else f"{scheme} (forced: this CPU has no native {scheme} unit, expect it slow)"
        x = _calib_x(calib, scheme, TIMING_BATCH) if compute == "auto" and calib is not None else None
        if isinstance(x, torch.Tensor):  # the unit is there; whether it pays is measured (compress/choose.py)
            from .choose import choose

            native_model = out
            choice = choose(model, x, candidates={scheme: lambda: native_model, "fp32": lambda: rounded},
                            batch=TIMING_BATCH, threads=[torch.get_num_threads()], strict=False)
            ms = {r["candidate"]: r["ms"] for r in choice.timings if "ms" in r}
            if choice.name == "fp32":
                spec, out = None, rounded
                how = f"fp32 (measured faster than native {scheme} on this CPU)"
            if len(ms) == 2:
                how += f" [batch {TIMING_BATCH}: {scheme} {ms[scheme]:.3f} ms, fp32 {ms['fp32']:.3f} ms]"
    else:
        spec, out = None, rounded
        why = "asked for" if compute == "fp32" else f"this CPU has no native {scheme}"
        how = f"fp32 ({why})"
    object.__setattr__(out, "slimfuse_codec", "half")
    precision = {p: f"{scheme} (computed in {how.split(' (')[0]})" for p, m in out.named_modules()
                 if any(True for _ in m.parameters(recurse=False))}
    return derive(model, out, "quantize", spec=spec, scheme=scheme, compute=how, precision=precision)


@_scheme("fp16")
def fp16(model: nn.Module, *, calib=None, compute: str = "auto") -> nn.Module:
    """Weights stored in float16 (2 bytes each); computed in float16 where the CPU has AMX-FP16/AVX512-FP16
    (``compute="auto"``; with ``calib``, only where a batch of it runs faster that way than in float32), else in
    float32 (``"half"`` / ``"fp32"`` force either; see module docstring)."""
    return _half(model, "fp16", compute, calib)


@_scheme("bf16")
def bf16(model: nn.Module, *, calib=None, compute: str = "auto") -> nn.Module:
    """Weights stored in bfloat16 (2 bytes each); computed in bfloat16 where the CPU has AMX-BF16/AVX-512 BF16
    (``compute="auto"``; with ``calib``, only where a batch of it runs faster that way than in float32), else in
    float32 (``"half"`` / ``"fp32"`` force either; see module docstring)."""
    return _half(model, "bf16", compute, calib)


def _encode_half(state: dict) -> tuple[dict, dict]:
    """Store each float32 tensor whose every value is exact in float16 (else bfloat16) in 2 bytes."""
    tensors, meta = {}, {"float16": [], "bfloat16": []}
    for key, t in state.items():
        tensors[key] = t
        if t.dtype != torch.float32:
            continue
        for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
            low = t.to(dtype)
            if torch.equal(low.float().view(torch.int32), t.view(torch.int32)):
                tensors[key] = low
                meta[name].append(key)
                break
    return tensors, meta


def _decode_half(tensors: dict, meta: dict) -> dict:
    state = dict(tensors)
    for key in meta.get("float16", []) + meta.get("bfloat16", []):
        state[key] = state[key].float()
    return state


register_codec("half", _encode_half, _decode_half)


# ---------------------------------------------------------------------------------------------
# mixed precision from per-layer sensitivity
# ---------------------------------------------------------------------------------------------
@_scheme("mixed")
def mixed(model: nn.Module, *, calib=None, max_drop: float = 0.5, high: str = "fp32",
          calibrator: str = "percentile", samples: int = 512, seed: int = 0) -> nn.Module:
    """Int8-static everywhere except the layers whose int8 version costs the most validation accuracy.

    Each layer is quantized alone and its accuracy drop measured on validation data; then the most
    sensitive layers are kept at ``high`` precision (``fp32``, ``fp16`` or ``bf16`` storage) one by one
    until the whole model's drop is at most ``max_drop`` points of accuracy (0.5 = half a point).
    """
    _check_source(model)
    if high not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"mixed: high must be fp32, fp16 or bf16, got {high!r}")
    if not (isinstance(max_drop, (int, float)) and 0 <= max_drop <= 100):
        raise ConfigError(f"mixed: max_drop is in accuracy points (0.5 = half a point), 0 to 100; got {max_drop!r}")
    if isinstance(calib, Splits):
        val = calib.val
    elif isinstance(calib, Split):
        val = calib
    else:
        raise ConfigError("mixed measures per-layer accuracy, so calib= must be labelled data (Splits or a Split; "
                          "CLI: --data)")
    if len(val) == 0:
        raise ConfigError("mixed: the validation split is empty")
    source, groups, ranges, _ = _calibrated(model, calib, "mixed", calibrator=calibrator, samples=samples,
                                         seed=seed)
    base = evaluate(source, val)
    paths = [g.path for g in groups]

    def drop(keep: set[str]) -> tuple[float, float]:
        """(accuracy drop, NLL increase) on ``val`` with all but ``keep`` in int8."""
        m = evaluate(_static(source, groups, ranges, dict.fromkeys(keep, high)), val)
        return base["accuracy"] - m["accuracy"], m["nll"] - base["nll"]

    # a few hundred validation samples make accuracy drops coarse: the NLL increase breaks ties
    sensitivity = {p: drop(set(paths) - {p}) for p in paths}
    order = sorted(paths, key=lambda p: sensitivity[p], reverse=True)
    for k in range(len(order) + 1):
        keep = set(order[:k])
        achieved = drop(keep)[0] if k < len(order) else 0.0
        if 100 * achieved <= max_drop + 1e-9:
            break
    q = _static(source, groups, ranges, dict.fromkeys(keep, high), scheme="mixed")
    if high != "fp32":
        _round_half(q.net, HALF[high], keep)
        object.__setattr__(q, "slimfuse_codec", "half")
    return _finish(model, q, "mixed", q.layers, max_drop_points=max_drop, high=high,
                   val_drop_points=round(100 * achieved, 4),
                   sensitivity={p: {"accuracy_drop": round(a, 6), "nll_increase": round(n, 6)}
                                for p, (a, n) in sensitivity.items()})
