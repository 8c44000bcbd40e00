"""Int8 layers whose state is plain tensors, packed for the int8 kernels lazily.

torch's int8 kernels (fbgemm through the ``x86`` engine: ``quantized::linear``,
``quantized::linear_dynamic``, ``quantized::conv2d``) take *packed* weights, an
opaque object that safetensors cannot hold. These modules keep what the kernels
need as ordinary tensors in their state dict:

- ``weight``: int8, per output channel, symmetric (``[-127, 127]``);
- ``weight_scale``: float32, one per output channel; ``weight_zero_point``: int32;
- ``bias``: float32 (the kernels add it in float);
- static layers also ``output_scale`` / ``output_zero_point`` (and ``input_*`` when
  the layer starts a quantized region): the calibrated activation grid.

The packed weight is built from these tensors on first use and dropped whenever
the state is loaded, so an artifact reloads bit-exactly with no pickle involved.

Activations use 7 bits of the uint8 grid (``reduce_range``): fbgemm's AVX2 kernels
(no VNNI on this project's CPUs) add pairs of uint8 x int8 products in int16, which
saturates with full 8-bit activations.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

QMAX_ACT = 127  # activations: uint8 grid with 7-bit scales (reduce_range)
QMAX_W = 127  # weights: symmetric int8
# the quantized ops these layers call; torch deprecates them (quint8/qint8 tensors, pytorch#184982)
KERNELS = ("linear_prepack", "linear", "linear_relu", "linear_dynamic", "linear_relu_dynamic", "conv2d_prepack",
           "conv2d", "conv2d_relu")


def missing_kernels() -> list[str]:
    """The ``torch.ops.quantized`` kernels this torch build lacks (none on torch 2.13); once torch
    removes them, torch-int8 models cannot run and the callers say so instead of failing mid-call."""
    if not hasattr(torch, "quint8"):
        return ["the quint8 dtype", *KERNELS]
    return [k for k in KERNELS if not hasattr(torch.ops.quantized, k)]


def no_kernels_message(missing: list[str]) -> str:
    return (f"this torch build ({torch.__version__}) has no int8 kernels for slimfuse's torch backend (missing "
            f"quantized::{', quantized::'.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); quantize the "
            "float model with backend='onnxruntime' (ONNX Runtime's int8 kernels) or 'auto'")


def activation_qparams(lo: float, hi: float, qmax: int = QMAX_ACT) -> tuple[float, int]:
    """Scale and zero point mapping ``[lo, hi]`` (widened to include 0) onto ``[0, qmax]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = float(torch.tensor(max((hi - lo) / qmax, 1e-8), dtype=torch.float32))
    zero_point = int(min(max(round(-lo / scale), 0), qmax))
    return scale, zero_point


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``(int8 weight, float32 scale)``."""
    w = w.detach().float()
    amax = w.abs().flatten(1).amax(1)
    scale = torch.where(amax > 0, amax / QMAX_W, torch.ones_like(amax)).float()
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = torch.round(w / scale.view(shape)).clamp(-QMAX_W, QMAX_W).to(torch.int8)
    return q, scale


class _Int8Layer(nn.Module):
    """Shared state and lazy packing of an int8 Linear / Conv2d."""

    slimfuse_cpu_only = True  # fbgemm kernels: the layer runs on the CPU only (slimfuse.devices.movable)

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, *, mode: str, relu: bool,
                 quant_input: bool, dequant_output: bool):
        super().__init__()
        if mode not in ("dynamic", "static"):
            raise ValueError(f"mode must be dynamic or static, got {mode!r}")
        self.mode, self.relu = mode, bool(relu)
        self.quant_input, self.dequant_output = bool(quant_input), bool(dequant_output)
        out = weight_shape[0]
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out))
        self.register_buffer("weight_zero_point", torch.zeros(out, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out) if bias else None)
        if mode == "static":
            if quant_input:
                self.register_buffer("input_scale", torch.ones(1))
                self.register_buffer("input_zero_point", torch.zeros(1, dtype=torch.int32))
            self.register_buffer("output_scale", torch.ones(1))
            self.register_buffer("output_zero_point", torch.zeros(1, dtype=torch.int32))
        self._packed = None

    # -- filling and reading the plain state --------------------------------------------------
    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        q, scale = quantize_weight(weight)
        self.weight.copy_(q)
        self.weight_scale.copy_(scale)
        self.weight_zero_point.zero_()
        if self.bias is not None:
            self.bias.copy_(bias.detach().float() if bias is not None else torch.zeros_like(self.bias))
        self._packed = None

    def set_ranges(self, input_range: tuple[float, float] | None, output_range: tuple[float, float]) -> None:
        """Activation grids (static mode) from calibrated ``(lo, hi)`` ranges."""
        if self.quant_input:
            s, z = activation_qparams(*input_range)
            self.input_scale.fill_(s)
            self.input_zero_point.fill_(z)
        s, z = activation_qparams(*output_range)
        self.output_scale.fill_(s)
        self.output_zero_point.fill_(z)
        self._packed = None

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.view((-1,) + (1,) * (self.weight.ndim - 1))

    def dequantized_weight(self) -> torch.Tensor:
        centered = self.weight.float() - self._per_channel(self.weight_zero_point).float()
        return centered * self._per_channel(self.weight_scale)

    def counts(self) -> dict[str, int]:
        nz = int(torch.count_nonzero(self.weight.int() - self._per_channel(self.weight_zero_point)))
        b = self.bias if self.bias is not None else torch.zeros(0)
        return {"params": self.weight.numel() + b.numel(), "nonzeros": nz + int(torch.count_nonzero(b))}

    # -- packing ----------------------------------------------------------------------------------
    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._packed = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def _qweight(self) -> torch.Tensor:
        return torch._make_per_channel_quantized_tensor(
            self.weight, self.weight_scale.double(), self.weight_zero_point.long(), 0)

    def packed(self):
        if self._packed is None:
            # torch 2.13 deprecates tensors of dtype quint8/qint8 (pytorch#184982) but has no other
            # eager route to fbgemm's int8 kernels: ``torch._int_mm`` and ``_weight_int8pack_mm``
            # measured 100-300x slower than fp32 here at batch 256, oneDNN's plain-tensor
            # ``qlinear_pointwise`` slower than fbgemm (BENCHMARKS.md). torch warns once per process,
            # so silencing it here, where the first quantized tensor is made, silences it for good.
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore", UserWarning)
                act = {}
                if self.mode == "static":
                    act["out"] = (float(self.output_scale), int(self.output_zero_point))
                    if self.quant_input:
                        act["in"] = (float(self.input_scale), int(self.input_zero_point))
                self._packed = (self._pack(), act)
        return self._packed

    def _run(self, x, kernel, kernel_relu, dynamic, dynamic_relu):
        packed, act = self.packed()
        if self.mode == "dynamic":
            return (dynamic_relu if self.relu else dynamic)(x, packed, True)
        if self.quant_input:
            x = torch.quantize_per_tensor(x.float(), *act["in"], torch.quint8)
        y = (kernel_relu if self.relu else kernel)(x, packed, *act["out"])
        # fbgemm's conv writes channels-last; a float output is made contiguous NCHW again so the
        # forward code around the layer (``x.view(x.size(0), -1)``) sees what the float layer gave
        return y.dequantize().contiguous() if self.dequant_output else y

    def extra_repr(self) -> str:
        flags = [self.mode] + [n for n in ("relu", "quant_input", "dequant_output") if getattr(self, n)]
        return f"{tuple(self.weight.shape)}, int8, {', '.join(flags)}"


class QLinear(_Int8Layer):
    """Int8 ``Linear``: ``dynamic`` (float in/out, activations quantized per call) or ``static``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "dynamic",
                 relu: bool = False, quant_input: bool = False, dequant_output: bool = False):
        super().__init__((out_features, in_features), bias, mode=mode, relu=relu,
                         quant_input=quant_input, dequant_output=dequant_output)
        self.in_features, self.out_features = in_features, out_features  # read by forward code

    @classmethod
    def like(cls, linear: nn.Linear, *, bias: bool | None = None, **flags) -> QLinear:
        has_bias = linear.bias is not None if bias is None else bias
        return cls(linear.in_features, linear.out_features, has_bias, **flags)

    def _pack(self):
        return torch.ops.quantized.linear_prepack(self._qweight(), self.bias)

    def forward(self, x):
        q = torch.ops.quantized
        return self._run(x, q.linear, q.linear_relu, q.linear_dynamic, q.linear_relu_dynamic)

    def to_float(self) -> nn.Module:
        lin = nn.Linear(self.weight.shape[1], self.weight.shape[0], self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return nn.Sequential(lin, nn.ReLU()) if self.relu else lin


class QConv2d(_Int8Layer):
    """Int8 ``Conv2d`` (static: quantized in, quantized out unless ``dequant_output``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, relu: bool = False, quant_input: bool = False,
                 dequant_output: bool = False):
        ks = nn.modules.utils._pair(kernel_size)
        super().__init__((out_channels, in_channels // groups, *ks), bias, mode="static", relu=relu,
                         quant_input=quant_input, dequant_output=dequant_output)
        self.stride, self.padding = nn.modules.utils._pair(stride), nn.modules.utils._pair(padding)
        self.dilation, self.groups = nn.modules.utils._pair(dilation), groups
        # the attributes of the Conv2d replaced, which forward code (and torchvision-style models) read
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.padding_mode, self.transposed, self.output_padding = "zeros", False, (0, 0)

    @classmethod
    def like(cls, conv: nn.Conv2d, *, bias: bool | None = None, **flags) -> QConv2d:
        has_bias = conv.bias is not None if bias is None else bias
        flags.pop("mode", None)
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.groups, has_bias, **flags)

    def _pack(self):
        return torch.ops.quantized.conv2d_prepack(self._qweight(), self.bias, list(self.stride),
                                                  list(self.padding), list(self.dilation), self.groups)

    def forward(self, x):
        q = torch.ops.quantized
        return self._run(x, q.conv2d.new, q.conv2d_relu.new, None, None)

    def to_float(self) -> nn.Module:
        conv = nn.Conv2d(self.weight.shape[1] * self.groups, self.weight.shape[0], self.weight.shape[2:],
                         self.stride, self.padding, self.dilation, self.groups, self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return nn.Sequential(conv, nn.ReLU()) if self.relu else conv


class FakeQuant(nn.Module):
    """Quantization-aware training stand-in for a Linear/Conv2d (BatchNorm folded, ReLU fused).

    Weights are fake-quantized per channel exactly as :func:`quantize_weight` will store them;
    activations (the input when the layer starts a region, and the output) are fake-quantized
    on the uint8 grid, their ranges tracked as an exponential moving average while training.
    Gradients pass straight through the rounding.
    """

    def __init__(self, layer: nn.Module, *, relu: bool, quant_input: bool, input_range, output_range,
                 momentum: float = 0.01):
        super().__init__()
        self.layer, self.relu, self.quant_input, self.momentum = layer, relu, quant_input, momentum
        self.register_buffer("input_range", torch.tensor(input_range or (0.0, 0.0), dtype=torch.float32))
        self.register_buffer("output_range", torch.tensor(output_range, dtype=torch.float32))

    def _fake(self, x: torch.Tensor, rng: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                seen = torch.stack([x.detach().min(), x.detach().max()])
                rng.lerp_(seen, self.momentum)
        scale, zp = activation_qparams(*rng.tolist())
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)

    def forward(self, x):
        if self.quant_input:
            x = self._fake(x, self.input_range)
        w = self.layer.weight
        with torch.no_grad():
            _, scale = quantize_weight(w)
        wq = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                    -QMAX_W, QMAX_W)
        if isinstance(self.layer, nn.Linear):
            y = F.linear(x, wq, self.layer.bias)
        else:
            c = self.layer
            y = F.conv2d(x, wq, c.bias, c.stride, c.padding, c.dilation, c.groups)
        if self.relu:
            y = F.relu(y)
        return self._fake(y, self.output_range)

    def ranges(self):
        return (tuple(self.input_range.tolist()) if self.quant_input else None), tuple(self.output_range.tolist())
