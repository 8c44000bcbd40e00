"""Compressing embedding tables: row-wise int8/int4 quantization, dimension pruning, distillation.

- :func:`quantize_tables`: every ``nn.Embedding`` becomes a :class:`QEmbedding` holding packed
  codes (int8: one byte per value, int4: two values per byte) and a float16 scale and offset per
  row; lookups dequantize the rows they touch on the fly. The result is a :class:`QTables` module
  (architecture ``qtables``: the source spec plus each table's bits), whose state dict *is* the
  packed bytes, so the artifact shrinks with no codec and reloads bit-exactly.
- :func:`prune_dims`: physically narrower tables. Matrix factorization keeps the best rank-r
  approximation of its score matrix (``U V^T``, from a QR + SVD of the factors); a two-tower model
  keeps the columns with the largest ``|table column| * |first tower weight column|``. Optionally
  fine-tuned through ``fit``.
- :func:`distill`: a small recommender learns a large one's ranking: a listwise cross-entropy
  towards the teacher's softmax over its top-k unseen items, plus the training interactions.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import zoo
from ..models.spec import attach, derive, spec_of
from ..train import Batch
from ..validate import check
from .data import Interactions
from .models import MF, TwoTower, check_ids
from .models import fit as rec_fit

BITS = (8, 4)
CLIP = torch.linspace(1.0, 0.7, 7)  # candidate clipping ratios of a row's range (int4)


class QEmbedding(nn.Module):
    """A row-wise quantized embedding table: ``row = offset + scale * code``, codes of ``bits`` bits."""

    def __init__(self, num: int, dim: int, bits: int):
        super().__init__()
        if bits not in BITS:
            raise ConfigError(f"embedding tables quantize to {' or '.join(map(str, BITS))} bits, not {bits!r}")
        self.num, self.dim, self.bits = num, dim, bits
        self.register_buffer("codes", torch.zeros(num, -(-dim * bits // 8), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(num, dtype=torch.float16))
        self.register_buffer("offset", torch.zeros(num, dtype=torch.float16))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int) -> QEmbedding:
        w = weight.detach().float()
        q = cls(w.shape[0], w.shape[1], bits)
        if not torch.isfinite(w).all() or w.abs().max() > 6e4:
            raise ConfigError("embedding table has values that are not finite or exceed float16's range")
        codes, scale, offset = _quantize_rows(w, bits)
        q.scale.copy_(scale.half())
        q.offset.copy_(offset.half())
        q.codes.copy_(_pack(codes.to(torch.uint8), bits))
        return q

    def dequantize(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        codes, scale, offset = (self.codes, self.scale, self.offset) if ids is None else (
            self.codes[ids], self.scale[ids], self.offset[ids])
        values = _unpack(codes, self.bits, self.dim).float()
        return torch.addcmul(offset.float()[..., None], values, scale.float()[..., None])

    @property
    def weight(self) -> torch.Tensor:
        """The whole table, dequantized (what scoring every item needs)."""
        return self.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dequantize(check_ids(ids, self.num, "row"))

    def extra_repr(self) -> str:
        return f"{self.num}, {self.dim}, bits={self.bits}"


def table_bytes(model: nn.Module) -> int:
    """Bytes of the tensors holding a model's embedding tables (fp32 weights, or packed codes + scale + offset)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QEmbedding):
            total += sum(t.numel() * t.element_size() for t in (m.codes, m.scale, m.offset))
    return total


def _quantize_rows(w: torch.Tensor, bits: int, refine: int = 4):
    """Per row: codes in 0..2**bits-1 and a float16 (scale, offset) with small squared error.

    Start from the row's min/max grid (for int4 also shrunk by each ratio in ``CLIP``, keeping the
    best per row), then alternate least-squares (scale, offset) for the codes and re-rounding the
    codes, keeping a row's new grid only where its error drops."""
    levels = 2**bits - 1

    def codes_for(scale, offset):
        codes = ((w - offset[:, None]) / scale[:, None]).round().clamp(0, levels)
        return codes, (codes * scale[:, None] + offset[:, None] - w).square().sum(1)

    def keep_better(best, new):
        better = new[0] < best[0]
        return [torch.where(better[:, None] if b.ndim == 2 else better, n, b) for b, n in zip(best, new)]

    lo, hi = w.min(1).values, w.max(1).values
    best = None
    for r in CLIP if bits == 4 else CLIP[:1]:
        scale, offset = _grid(lo * r, hi * r, levels)
        codes, err = codes_for(scale, offset)
        best = [err, scale, offset, codes] if best is None else keep_better(best, [err, scale, offset, codes])
    for _ in range(refine):
        err, scale, offset, codes = best
        cc = codes - codes.mean(1, keepdim=True)
        var = cc.square().sum(1)
        fit_scale = torch.where(var > 0, (cc * w).sum(1) / var.clamp_min(1e-12), scale)
        fit_offset = w.mean(1) - fit_scale * codes.mean(1)
        scale, offset = _grid(fit_offset, fit_offset + fit_scale * levels, levels)
        codes, err = codes_for(scale, offset)
        best = keep_better(best, [err, scale, offset, codes])
    return best[3], best[1], best[2]


def _grid(lo: torch.Tensor, hi: torch.Tensor, levels: int):
    """float16-representable (scale, offset) per row, as float32; a constant row gets scale 1."""
    scale = ((hi - lo) / levels).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo.half().float()


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    if bits == 8:
        return packed
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)[..., :dim]


class QTables(nn.Module):
    """``net`` with some embedding tables replaced by :class:`QEmbedding`; ``forward`` is ``net``'s."""

    def __init__(self, net: nn.Module, bits: dict[str, int]):
        super().__init__()
        self.net, self.bits = net, dict(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def slimfuse_counts(self) -> dict[str, int]:
        """Table entries count as parameters (quantized ones included), so rows compare with the source."""
        params = nonzeros = 0
        for m in self.net.modules():
            tensors = [m.dequantize()] if isinstance(m, QEmbedding) else list(m.parameters(recurse=False))
            params += sum(t.numel() for t in tensors)
            nonzeros += sum(int(torch.count_nonzero(t)) for t in tensors)
        return {"params": params, "nonzeros": nonzeros}


def _replace(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)


@zoo.register("qtables")
def qtables(base: dict, bits: dict) -> nn.Module:
    """Rebuild a table-quantized model: the source architecture with empty quantized tables."""
    net = zoo.build(base)
    for name, b in bits.items():
        emb = net.get_submodule(name)
        _replace(net, name, QEmbedding(emb.num_embeddings, emb.embedding_dim, int(b)))
    return attach(QTables(net, bits), {"arch": "qtables", "args": {"base": base, "bits": bits}})


def quantize_tables(model: nn.Module, bits: int = 8, *, tables: list[str] | None = None) -> nn.Module:
    """A copy of ``model`` whose embedding tables (all, or those named) are row-wise ``bits``-bit."""
    if bits not in BITS:
        raise ConfigError(f"embedding tables quantize to {' or '.join(map(str, BITS))} bits, not {bits!r}")
    if isinstance(model, QTables):
        raise ConfigError("this model's tables are already quantized; quantize the float model instead")
    found = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    names = found if tables is None else list(tables)
    unknown = sorted(set(names) - set(found))
    if unknown or not names:
        raise ConfigError(f"no embedding table(s) {', '.join(unknown) or ''} to quantize "
                          f"(tables: {', '.join(found) or 'none'})")
    net = copy.deepcopy(model)
    for name in names:
        _replace(net, name, QEmbedding.from_float(net.get_submodule(name).weight, bits))
    net.eval()
    plan = dict.fromkeys(names, bits)
    base = spec_of(model)
    result = QTables(net, plan)
    if base is not None:
        attach(result, {"arch": "qtables", "args": {"base": base, "bits": plan}})
    result = derive(model, result, "quantize_tables", spec=spec_of(result), bits=bits)
    return check(result, f"quantize_tables(bits={bits})", data=_users(model),
                 fix="bits=8, or tables= without the failing one")


def _users(model: nn.Module) -> torch.Tensor | None:
    """A sample of user ids for the validation gate (recommenders take user ids, no data needed)."""
    n = getattr(model, "n_users", None)
    return torch.arange(min(int(n), 256)) if isinstance(n, int) and n > 0 else None


def _keep(dim: int, keep: float | int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ConfigError(f"keep must be a fraction in (0, 1) or a number of dimensions, got {keep!r}")
    r = round(dim * keep) if isinstance(keep, float) else keep
    if not (0 < keep < 1 if isinstance(keep, float) else 1 <= keep < dim) or r < 1:
        raise ConfigError(f"keep must be a fraction in (0, 1) or a number of dimensions in 1..{dim - 1}, got {keep!r}")
    return int(r)


@torch.no_grad()
def prune_dims(model: nn.Module, keep: float | int, *, data: Interactions | None = None, epochs: int = 0,
               lr: float = 2e-3, seed: int = 0, **fit_kwargs) -> nn.Module:
    """A copy of ``model`` with ``keep`` (a fraction, or a count) of its embedding dimensions.

    With ``data`` and ``epochs`` the narrower model is fine-tuned (``recsys.fit``; its ``loss`` etc.
    through ``fit_kwargs``).
    """
    if isinstance(model, MF):
        r = _keep(model.users.embedding_dim, keep)
        new = zoo.build({"arch": "mf", "args": {"n_users": model.n_users, "n_items": model.n_items, "dim": r}})
        qu, ru = torch.linalg.qr(model.users.weight.double())
        qv, rv = torch.linalg.qr(model.items.weight.double())
        a, s, bt = torch.linalg.svd(ru @ rv.T)
        root = s[:r].sqrt()
        new.users.weight.copy_(qu @ a[:, :r] * root)
        new.items.weight.copy_(qv @ bt[:r].T * root)
        new.bias.copy_(model.bias)
    elif isinstance(model, TwoTower):
        spec = spec_of(model)
        r = _keep(model.users.embedding_dim, keep)
        new = zoo.build({"arch": "two-tower", "args": {**spec["args"], "dim": r}})
        rest = {k: v for k, v in model.state_dict().items() if k not in _FIRST_LAYERS}
        new.load_state_dict(rest, strict=False)
        for table, tower in (("users", "user_tower"), ("items", "item_tower")):
            emb, first = getattr(model, table).weight, getattr(model, tower)[0]
            cols = (emb.norm(dim=0) * first.weight.norm(dim=0)).topk(r).indices.sort().values
            getattr(new, table).weight.copy_(emb[:, cols])
            getattr(new, tower)[0].weight.copy_(first.weight[:, cols])
    else:
        raise ConfigError(f"prune_dims prunes mf and two-tower models, not {type(model).__name__}")
    new = derive(model, new, "prune_dims", spec=spec_of(new), dim=r)
    if data is not None and epochs:
        with torch.enable_grad():
            new = rec_fit(new, data, epochs=epochs, lr=lr, seed=seed, op=None, **fit_kwargs)
    return check(new, "prune_dims", data=data if data is not None else _users(model), fix="a larger keep=")


_FIRST_LAYERS = {"users.weight", "items.weight", "user_tower.0.weight", "item_tower.0.weight"}


@torch.no_grad()
def teacher_topk(teacher: nn.Module, data: Interactions, k: int, temperature: float):
    """Per user: the teacher's top-k items among those not in its training history, and their softmax."""
    was_training = teacher.training
    teacher.eval()
    idx, prob = [], []
    try:
        for lo in range(0, data.n_users, 1024):
            users = torch.arange(lo, min(lo + 1024, data.n_users))
            s = teacher(users).float().masked_fill(data.train_mask(users), float("-inf"))
            top = s.topk(k, dim=1)
            idx.append(top.indices)
            prob.append((top.values / temperature).softmax(1))
    finally:
        teacher.train(was_training)
    return torch.cat(idx), torch.cat(prob)


def distill(teacher: nn.Module, student: nn.Module, data: Interactions, *, k: int = 50, temperature: float = 1.0,
            alpha: float = 0.5, epochs: int = 15, lr: float = 1e-2, batch_size: int = 2048, seed: int = 0,
            weight_decay: float | None = None, **fit_kwargs) -> nn.Module:
    """Train ``student`` on ``teacher``'s rankings (listwise) and on the training interactions.

    Loss per training interaction (u, i): ``alpha * T^2 * CE(teacher top-k softmax at T,
    student softmax at T over all items)`` plus ``(1 - alpha) * CE(i, student softmax)``.
    The teacher is any module scoring all items for user ids (an ensemble too).
    """
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha!r}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= data.n_items:
        raise ConfigError(f"k must be an integer in 1..{data.n_items}, got {k!r}")
    top_idx, top_p = teacher_topk(teacher, data, k, temperature)

    def loss(scores: torch.Tensor, batch: Batch) -> torch.Tensor:
        # the teacher's distribution is over the user's unseen items: match the student's over those
        logq = (scores / temperature).masked_fill(data.train_mask(batch.x), float("-inf")).log_softmax(1)
        soft = -(top_p[batch.x] * logq.gather(1, top_idx[batch.x])).sum(1).mean() * temperature**2
        return alpha * soft + (1 - alpha) * F.cross_entropy(scores, batch.y)

    from ..train import fit

    if weight_decay is None:  # as recsys.fit: only matrix factorization (all item rows move every step)
        weight_decay = 1e-4 if isinstance(student, MF) else 0.0
    trained = fit(student, data, loss=loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, op=None,
                  weight_decay=weight_decay, **fit_kwargs)
    trained = derive(student, trained, "distill", teacher=_arch(teacher), k=k, temperature=temperature, alpha=alpha)
    return check(trained, "distill (recommender)", data=data, fix="more epochs=, or a lower lr=")


def _arch(model: nn.Module) -> str:
    spec = spec_of(model) or {}
    return spec.get("arch") or spec.get("factory") or type(model).__name__
