"""Structured pruning of GPT-2-family blocks: ``transformers``' ``Conv1D`` attention heads and MLP widths.

Torch-Pruning cannot trace these blocks (the fused query/key/value projection is split by
``tensor.split``, and ``Conv1D`` stores its weight transposed), and ``transformers`` no longer ships head
pruning. The layout is small and fixed, so it is pruned here directly:

- an attention module (``hf.conv1d_attention``) loses whole heads: head ``h`` is the columns
  ``h*d : (h+1)*d`` of each of the query, key and value blocks of ``c_attn`` and the same rows of
  ``c_proj``; ``num_heads`` and ``split_size`` are updated, ``head_dim`` stays, so the forward pass
  is the original with those heads silenced;
- an MLP (``hf.conv1d_mlps``) loses hidden units: columns of ``c_fc``, rows of ``c_proj``.

The residual stream (embeddings, LayerNorms, every block's output width) stays whole. A unit's
importance is the L1 or L2 norm of all its weights, or with ``taylor`` the sum of |weight x gradient|;
``scope="layer"`` removes the same fraction from each module, ``"global"`` ranks units of one kind
across modules (scores divided by their module's mean) and keeps at least one head or unit per module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from . import hf


class Conv1DPruner:
    """Prunes ``ratio`` of the heads of every attention module and of the hidden units of every MLP
    in ``steps`` equal steps (``step()`` each); ``skip``: ids of modules left whole."""

    def __init__(self, model: nn.Module, *, ratio: float, steps: int, importance: str, scope: str,
                 round_to: int | None, skip: set[int]):
        self.model, self.ratio, self.steps, self.importance, self.scope = model, ratio, steps, importance, scope
        self.round_to, self.done = round_to, 0
        def kept(m) -> bool:
            return not any(id(c) in skip for c in m.modules())

        self.attention = {n: m for n, m in hf.conv1d_attention(model).items() if kept(m)}
        self.mlps = {n: m for n, m in hf.conv1d_mlps(model).items() if kept(m)}
        self.start = {**{n: m.num_heads for n, m in self.attention.items()},
                      **{n: m.c_fc.nf for n, m in self.mlps.items()}}

    def __bool__(self) -> bool:
        return bool(self.attention or self.mlps)

    @torch.no_grad()
    def step(self) -> None:
        self.done += 1
        fraction = self.ratio * self.done / self.steps
        heads = {n: self._head_scores(m) for n, m in self.attention.items()}
        units = {n: self._unit_scores(m) for n, m in self.mlps.items()}
        for n, keep in self._keep(heads, fraction, round_to=None).items():
            self._cut_heads(self.attention[n], keep)
        for n, keep in self._keep(units, fraction, round_to=self.round_to).items():
            self._cut_units(self.mlps[n], keep)

    # -- importance -----------------------------------------------------------------------------
    def _saliency(self, t: torch.Tensor) -> torch.Tensor:
        """Per-weight terms summed into a unit's score: |w|, w^2 (then a square root), or |w x grad|."""
        if self.importance == "taylor":
            return (t * t.grad).abs() if t.grad is not None else torch.zeros_like(t)
        return t.pow(2) if self.importance == "l2" else t.abs()

    def _finish(self, total: torch.Tensor) -> torch.Tensor:
        return (total.sqrt() if self.importance == "l2" else total).double()

    def _head_scores(self, m) -> torch.Tensor:
        heads, d, split = m.num_heads, m.head_dim, m.split_size
        w, b = self._saliency(m.c_attn.weight), self._saliency(m.c_attn.bias)  # (nx, 3*split), (3*split,)
        total = self._saliency(m.c_proj.weight).reshape(heads, d, -1).sum((1, 2))  # rows h*d:(h+1)*d
        for block in range(3):  # the query, key and value columns of each head
            cols = slice(block * split, (block + 1) * split)
            total = total + w[:, cols].reshape(-1, heads, d).sum((0, 2)) + b[cols].reshape(heads, d).sum(1)
        return self._finish(total)

    def _unit_scores(self, m) -> torch.Tensor:
        fc = self._saliency(m.c_fc.weight).sum(0) + self._saliency(m.c_fc.bias)
        return self._finish(fc + self._saliency(m.c_proj.weight).sum(1))

    def _keep(self, scores: dict[str, torch.Tensor], fraction: float, round_to: int | None) -> dict[str, list[int]]:
        """Per module, the indices of the units kept (sorted), removing ``fraction`` of its original count."""
        out = {}
        if self.scope == "global" and len(scores) > 1:
            pooled = torch.cat([s / s.mean().clamp_min(1e-12) for s in scores.values()])
            total = sum(self.start[n] for n in scores)
            gone = total - len(pooled)  # removed by the earlier steps
            drop = max(0, min(round(fraction * total) - gone, len(pooled) - len(scores)))
            cut = pooled.sort().values[drop - 1] if drop > 0 else -float("inf")
            for n, s in scores.items():
                normed = s / s.mean().clamp_min(1e-12)
                k = max(1, int((normed > cut).sum()))
                out[n] = _top(s, _rounded(k, round_to, len(s)))
            return out
        for n, s in scores.items():
            k = max(1, self.start[n] - round(fraction * self.start[n]))
            out[n] = _top(s, _rounded(min(k, len(s)), round_to, len(s)))
        return out

    # -- surgery --------------------------------------------------------------------------------
    @staticmethod
    def _cut_heads(m, keep: list[int]) -> None:
        if len(keep) == m.num_heads:
            return
        d, split = m.head_dim, m.split_size
        within = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
        _cut(m.c_attn, out_idx=torch.cat([within + block * split for block in range(3)]))
        _cut(m.c_proj, in_idx=within)
        m.num_heads, m.split_size = len(keep), len(keep) * d

    @staticmethod
    def _cut_units(m, keep: list[int]) -> None:
        if len(keep) == m.c_fc.nf:
            return
        idx = torch.tensor(keep)
        _cut(m.c_fc, out_idx=idx)
        _cut(m.c_proj, in_idx=idx)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """The ``k`` highest-scoring indices in their original order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def _rounded(k: int, round_to: int | None, n: int) -> int:
    if not round_to:
        return k
    return min(n, max(round_to, round_to * round(k / round_to)))


def _cut(c: nn.Module, *, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> None:
    """Keep the output features ``out_idx`` / input features ``in_idx`` of a Conv1D (weight ``(in, out)``)."""
    w, b = c.weight.detach(), c.bias.detach()
    if out_idx is not None:
        w, b = w[:, out_idx], b[out_idx]
        c.nf = len(out_idx)
    if in_idx is not None:
        w = w[in_idx]
        c.nx = len(in_idx)
    if w.numel() == 0:
        raise ConfigError("structured pruning would remove every unit of a Conv1D layer")
    c.weight = nn.Parameter(w.contiguous().clone(), requires_grad=c.weight.requires_grad)
    c.bias = nn.Parameter(b.contiguous().clone(), requires_grad=c.bias.requires_grad)
