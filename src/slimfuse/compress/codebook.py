"""``codebook:N``: Deep Compression's weight sharing, stored bit-packed and entropy-coded.

Each Linear/Conv layer's weights are clustered by 1-D k-means into ``2**N``
shared values (linear initialisation over the weight range, as in Han et al.),
optionally fine-tuned (the cluster assignments stay fixed; after every optimizer
step each centroid becomes the mean of its members, through ``fit``'s
``after_step`` hook). Exact zeros, e.g. of a pruned model, are never clustered:
they stay zero.

The module itself stays a plain float model (inference runs the decoded
weights in torch, so latency is fp32's); the savings are in the artifact: the
storage codec ``codebook`` stores every float32 tensor with at most 256
distinct values as its codebook plus per-weight indices, and a tensor with
many zeros as a zstd-coded bitmask plus only the non-zeros' indices. Indices
are bit-packed or kept one per byte, whichever zstd compresses smaller. The
codec is lossless on bit patterns, so reloads are bit-exact.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from ..checkpoint import Resume
from ..data import Splits
from ..data.feed import feed
from ..errors import ArtifactError, ConfigError
from ..limits import check_bytes
from ..models.artifact import register_codec
from ..models.spec import derive
from ..train import fit
from .schemes import register_scheme
from .sparse import compress, declared_bytes, decompress

CODEC = "codebook"
BITS = range(2, 9)
MIN_CODED = 64  # tensors smaller than this are stored raw


@register_scheme("codebook", "torch")
def codebook(model: nn.Module, *, arg=None, calib=None, data: Splits | None = None, epochs: int | None = None,
             lr: float = 1e-4, iters: int = 30, seed: int = 0, checkpoint=None,
             device: str | torch.device | None = "cpu", **unknown) -> nn.Module:
    """Share each Linear/Conv layer's weights among ``2**N`` values (``scheme="codebook:N"``).

    ``data``: with training data the centroids are fine-tuned for ``epochs`` (default 2) at ``lr``.
    Parameters of other layer types (BatchNorm, embeddings...) and all biases stay float and are
    listed in the lineage step (``float_params``). ``checkpoint`` (a folder): the fine-tuning
    resumes from it when rerun with the same arguments (see :func:`slimfuse.fit`). ``device``: where the
    fine-tuning runs (:func:`slimfuse.devices.resolve`); the result comes back on the CPU.
    """
    if unknown:
        raise ConfigError(f"unknown option(s) for codebook: {', '.join(sorted(unknown))} "
                          "(known: data, epochs, lr, iters, seed, checkpoint, device)")
    bits = _bits(arg)
    if not isinstance(model, nn.Module) or getattr(model, "slimfuse_runtime", "torch") != "torch":
        raise ConfigError("codebook works on torch modules; quantize an ONNX model with int8-static/int8-dynamic")
    if data is None and isinstance(calib, Splits):  # quantize(model, "codebook:N", calib=splits)
        data = calib
    if data is not None and not isinstance(data, Splits):  # a DataLoader ...: fine-tuned on it, streamed
        data = feed(data, labels=True, where="the fine-tuning data")
    epochs = (2 if data is not None else 0) if epochs is None else epochs
    if epochs and data is None:
        raise ConfigError("codebook fine-tuning needs data= (Splits, or a DataLoader of labelled batches); pass "
                          "data or epochs=0")
    q = copy.deepcopy(model).eval()
    layers = {name: m for name, m in q.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    if not layers:
        raise ConfigError("codebook found no Linear or Conv layer to quantize in this model")
    assign = {}
    with torch.no_grad():
        for name, m in layers.items():
            assign[name] = _cluster(m.weight, 2**bits, iters)
    snap = _Snap(assign)
    if epochs:
        resume = None if checkpoint is None else Resume(checkpoint, key={"op": "codebook", "bits": bits,
                                                                         "iters": iters})
        q = fit(q, data, epochs=epochs, lr=lr, seed=seed, after_step=snap, op=None, checkpoint=resume, device=device)
    snap(q)
    coded = {f"{n}.weight" for n in layers}
    left = [n for n, _ in q.named_parameters() if n not in coded]
    object.__setattr__(q, "slimfuse_codec", CODEC)
    sparse = sum(int((~mask).sum()) for _, mask in assign.values())
    return derive(model, q, "quantize", scheme=f"codebook:{bits}", backend="torch", finetune_epochs=epochs or None,
                  zeros_kept=sparse or None, float_params=left or None)


def _bits(arg) -> int:
    try:
        bits = int(arg)
    except (TypeError, ValueError):
        raise ConfigError(f"codebook needs a bit width: 'codebook:N' with N in 2..8, got {arg!r}") from None
    if bits not in BITS:
        raise ConfigError(f"codebook bit width must be in 2..8 (2**N shared values per layer), got {bits}")
    return bits


def _cluster(weight: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of the non-zero weights (linear init); writes the shared values into ``weight``.

    Returns (assignment of each non-zero weight, mask of non-zeros).
    """
    w = weight.data
    mask = w != 0
    values = w[mask].double()
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.long), mask
    centroids = torch.linspace(float(values.min()), float(values.max()), k, dtype=torch.float64)
    for _ in range(iters):
        idx = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.bincount(idx, weights=values, minlength=k)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(new, centroids):
            break
        centroids, _ = new.sort()
    idx = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
    w[mask] = centroids[idx].to(w.dtype)
    return idx, mask


class _Snap:
    """``after_step`` hook: each centroid <- mean of its members; pruned weights stay exactly zero."""

    def __init__(self, assign: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.assign = assign

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        for name, (idx, mask) in self.assign.items():
            w = model.get_submodule(name).weight.data
            idx, mask = idx.to(w.device), mask.to(w.device)
            if idx.numel():
                k = int(idx.max()) + 1
                sums = torch.bincount(idx, weights=w[mask].double(), minlength=k)
                counts = torch.bincount(idx, minlength=k).clamp_min(1)
                w[mask] = (sums / counts)[idx].to(w.dtype)
            w[~mask] = 0.0


# -- storage codec ------------------------------------------------------------------------------

def _pack(idx: np.ndarray, bits: int) -> bytes:
    planes = (idx[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _unpack(data: bytes, bits: int, n: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, np.uint8), count=n * bits, bitorder="little").reshape(n, bits)
    return (planes.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(1).astype(np.uint8)


def _indices(idx: np.ndarray, k: int, coder=compress) -> tuple[dict, bytes]:
    """Indices as the smaller of bit-packed+zstd and one-byte+zstd."""
    bits = max(1, math.ceil(math.log2(k)))
    packed, plain = coder(_pack(idx, bits)), coder(idx.astype(np.uint8).tobytes())
    if len(packed) <= len(plain):
        return {"bits": bits, "idx": len(packed)}, packed
    return {"bits": 8, "idx": len(plain)}, plain


def _encode_one(arr: np.ndarray, coder=compress) -> tuple[dict, list[bytes]]:
    raw = arr.tobytes()
    if arr.dtype != np.float32 or arr.size < MIN_CODED:
        return {"mode": "raw", "len": len(raw)}, [raw]
    words = arr.reshape(-1).view(np.uint32)
    values, inverse = np.unique(words, return_inverse=True)
    if len(values) > 256:
        return {"mode": "raw", "len": len(raw)}, [raw]
    info, idx = _indices(inverse.astype(np.uint8), len(values), coder)
    best = ({"mode": "dense", "k": len(values), **info}, [values.tobytes(), idx])
    if values[0] == 0 and len(values) > 1:  # exact +0.0 weights: bitmask + non-zeros' indices only
        nz = words != 0
        nz_values, nz_inverse = np.unique(words[nz], return_inverse=True)
        mask = coder(np.packbits(nz, bitorder="little").tobytes())
        info, idx = _indices(nz_inverse.astype(np.uint8), len(nz_values), coder)
        cand = ({"mode": "sparse", "k": len(nz_values), "nnz": int(nz.sum()), "mask": len(mask), **info},
                [nz_values.tobytes(), mask, idx])
        if sum(map(len, cand[1])) < sum(map(len, best[1])):
            best = cand
    return best


def payload_bytes(model: nn.Module, *, entropy: bool = True) -> int:
    """Bytes of a codebook model's weight payload, with or without the entropy coder (zstd): the
    "quantized" and "entropy-coded" stages of a Deep Compression table."""
    tensors, _ = encode(model.state_dict(), coder=compress if entropy else bytes)
    return int(tensors["codebook.payload"].numel())


def encode(state: dict[str, torch.Tensor], coder=compress) -> tuple[dict[str, torch.Tensor], dict]:
    entries, chunks = [], []
    for name, t in state.items():
        arr = t.detach().cpu().contiguous().numpy()
        info, parts = _encode_one(arr, coder)
        entries.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape), **info})
        chunks += parts
    payload = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    return {"codebook.payload": torch.from_numpy(payload)}, {"tensors": entries}


def decode(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    buf = tensors["codebook.payload"].numpy().tobytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(buf):
            raise ValueError("payload is shorter than the card says")
        pos += n
        return buf[pos - n:pos]

    entries = meta.get("tensors")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError("storage meta has no list of tensor entries")
    # every entry is decoded into at most 8 bytes per element (uint32 words, then float32)
    check_bytes(declared_bytes((e.get("shape"), 8) for e in entries), "decoding the codebook tensors",
                ArtifactError)
    state = {}
    for e in entries:
        dtype, shape = np.dtype(e["dtype"]), tuple(e["shape"])
        n = math.prod(shape)
        if e["mode"] == "raw":
            arr = np.frombuffer(take(e["len"]), dtype=dtype).copy()
        else:
            values = np.frombuffer(take(4 * e["k"]), dtype=np.uint32)
            if e["mode"] == "sparse":
                nz = np.unpackbits(np.frombuffer(decompress(take(e["mask"]), (n + 7) // 8), np.uint8),
                                   count=n, bitorder="little").astype(bool)
                if int(nz.sum()) != e["nnz"]:
                    raise ValueError(f"{e['name']}: bitmask does not match the non-zero count")
                words = np.zeros(n, dtype=np.uint32)
                words[nz] = values[_read_indices(take(e["idx"]), e["bits"], e["nnz"])]
            else:
                words = values[_read_indices(take(e["idx"]), e["bits"], n)]
            arr = words.view(np.float32)
        if arr.size != n:
            raise ValueError(f"{e['name']}: {arr.size} values for shape {list(shape)}")
        state[e["name"]] = torch.from_numpy(arr.reshape(shape))
    if pos != len(buf):
        raise ValueError("payload is longer than the card says")
    return state


def _read_indices(data: bytes, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return np.frombuffer(decompress(data, n), np.uint8)
    return _unpack(decompress(data, (n * bits + 7) // 8), bits, n)


register_codec(CODEC, encode, decode)
