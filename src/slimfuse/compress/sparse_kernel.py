"""Sparsity that runs faster where it does: Linear layers through torch's CSR kernel, chosen per layer by measurement.

``sparse_kernels(model, sample, batch=256)`` times every Linear layer of ``model`` (on the inputs it really
receives for ``sample``, repeated to ``batch``) dense and as a CSR ``sparse @ dense`` product, in
interleaved rounds, and swaps in a :class:`SparseLinear` where CSR measured at least ``min_speedup``
faster. The weights do not change (a ``SparseLinear`` is an ``nn.Linear`` whose forward uses a CSR copy
of its weight, rebuilt when the weight changes), so the state dict and the ``sparse-zstd`` codec stay
as they are; the spec ``{"arch": "sparse-kernels", "args": {"base", "layers"}}`` records which layers
run sparse, so a reload runs the same kernels. ``model.slimfuse_kernels`` has each layer's timings.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..measure import median_seconds
from ..models.keras import torch_of
from ..models.spec import derive, spec_of
from ..models.zoo import build, register


class SparseLinear(nn.Linear):
    """An ``nn.Linear`` computed as ``W_csr @ x^T`` (torch CSR kernel); same parameters, same state dict."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self._csr, self._key = None, None

    @classmethod
    def of(cls, layer: nn.Linear) -> SparseLinear:
        out = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
        out.load_state_dict(layer.state_dict())
        return out.train(layer.training)

    def csr(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), None if w.is_inference() else w._version)  # inference tensors have no version
        if self._csr is None or self._key != key:
            with warnings.catch_warnings():  # "CSR support is in beta": measured, and chosen only where faster
                warnings.simplefilter("ignore", UserWarning)
                self._csr, self._key = self.weight.detach().to_sparse_csr(), key
        return self._csr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:  # training: the dense path has gradients
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
        y = (self.csr() @ flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def __deepcopy__(self, memo):
        new = SparseLinear(self.in_features, self.out_features, bias=self.bias is not None)
        new.load_state_dict(copy.deepcopy(self.state_dict(), memo))
        return new.train(self.training)


def _swap(model: nn.Module, paths: list[str]) -> nn.Module:
    for path in paths:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, name)
        if not isinstance(layer, nn.Linear):
            raise ConfigError(f"sparse-kernels: {path!r} is not a Linear layer")
        setattr(owner, name, SparseLinear.of(layer))
    return model


@register("sparse-kernels")
def sparse_kernels_arch(base: dict, layers: list[str]) -> nn.Module:
    """Architecture: the ``base`` architecture with ``layers`` (Linear paths) computed through CSR."""
    return _swap(build(base), layers)


def sparse_kernels(model: nn.Module, sample: torch.Tensor, *, batch: int = 256, min_speedup: float = 1.1,
                   rounds: int = 5, runs: int = 5) -> nn.Module:
    """A copy of ``model`` whose Linear layers run through CSR where measured ``min_speedup`` x faster.

    ``sample``: inputs (repeated to ``batch`` rows); each layer is timed on the activations it receives.
    Returns the copy (lineage step ``sparse_kernels`` with each layer's dense/CSR ms and sparsity)."""
    model = torch_of(model)
    if not isinstance(sample, torch.Tensor) or sample.ndim < 2 or len(sample) == 0:
        raise ConfigError("sparse_kernels: sample must be a non-empty batch of inputs (a tensor)")
    if not (isinstance(batch, int) and batch >= 1) or not min_speedup > 0:
        raise ConfigError(f"sparse_kernels: batch must be >= 1 and min_speedup > 0, got {batch!r}, {min_speedup!r}")
    out = copy.deepcopy(model).eval()
    linears = {p: m for p, m in out.named_modules() if type(m) is nn.Linear}
    if not linears:
        raise ConfigError("sparse_kernels: the model has no Linear layer")
    x = sample.repeat(-(-batch // len(sample)), *([1] * (sample.ndim - 1)))[:batch].contiguous()
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, p=p: seen.setdefault(p, i[0].detach().clone()))
             for p, m in linears.items()]
    with torch.inference_mode():
        out(x)
    for h in hooks:
        h.remove()
    timings, chosen = {}, []
    for path, layer in linears.items():
        if path not in seen:
            continue
        sparse = SparseLinear.of(layer).eval()
        with torch.inference_mode():
            dense_t, csr_t = [], []
            for _ in range(rounds):  # interleaved, so load drift hits both alike
                dense_t.append(median_seconds(layer, seen[path], runs))
                csr_t.append(median_seconds(sparse, seen[path], runs))
            d, c = float(np.median(dense_t)), float(np.median(csr_t))
            zeros = float((layer.weight == 0).float().mean())
            timings[path] = {"dense_ms": d * 1e3, "csr_ms": c * 1e3, "speedup": d / c, "sparsity": round(zeros, 4)}
            if d / c >= min_speedup:
                chosen.append(path)
    _swap(out, chosen)
    object.__setattr__(out, "slimfuse_kernels", timings)
    if hasattr(model, "slimfuse_codec"):
        object.__setattr__(out, "slimfuse_codec", model.slimfuse_codec)
    base = spec_of(model)
    spec = {"arch": "sparse-kernels", "args": {"base": base, "layers": chosen}} if base and chosen else None
    return derive(model, out, "sparse_kernels", spec=spec, batch=batch, layers=chosen,
                  timings={p: {k: round(v, 4) for k, v in t.items()} for p, t in timings.items()})
