"""Sparse storage: the ``sparse-zstd`` storage codec.

Each tensor with enough zeros is stored as two zstandard-compressed ``uint8``
tensors in ``weights.safetensors``: a packed bitmask of its non-zero elements
(``sparse::<name>::mask``) and the non-zero values with their bytes split into
planes (``sparse::<name>::values``; the exponent bytes of floats compress far
better apart from the mantissa bytes). A tensor that would not get smaller,
counting the two extra safetensors header entries and its longer card entry,
stays dense under its own name (and ``save`` writes the whole artifact dense
when even that is not smaller than the dense form). ``card["storage"]["meta"]`` lists every tensor's
layout, shape, dtype and non-zero count, so the card says how each was stored.

"Non-zero" means any bit set, so ``-0.0`` and NaN payloads survive: decoding
restores the state dict bit-exactly, whatever the dtype.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import zstandard

from ..errors import ArtifactError
from ..limits import check_bytes
from ..models.artifact import register_codec

CODEC = "sparse-zstd"
LEVEL = 19
PREFIX = "sparse::"


def compress(data: bytes) -> bytes:
    """The project's entropy coder (zstd, level 19), shared by the sparse and codebook codecs."""
    return zstandard.ZstdCompressor(level=LEVEL).compress(data)


def decompress(data: bytes, size: int) -> bytes:
    """Inverse of :func:`compress`; refuses a payload that does not decode to exactly ``size`` bytes.

    Streams with a hard cap: never more than ``size`` (checked against the memory budget) plus
    one chunk is produced, whatever the frame header claims, so a zstd bomb costs nothing."""
    if size < 0:
        raise ArtifactError(f"compressed payload: negative size {size}")
    check_bytes(size, "a compressed tensor", ArtifactError)
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
            while len(out) <= size:
                chunk = reader.read(min(1 << 20, size + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as e:
        raise ArtifactError(f"compressed payload is corrupt ({e})") from None
    if len(out) != size:
        got = f"more than {size}" if len(out) > size else str(len(out))
        raise ArtifactError(f"compressed payload decodes to {got} bytes, expected {size}")
    return bytes(out)


def declared_bytes(shapes_dtypes) -> int:
    """Bytes of tensors declared as ``(shape, itemsize)`` pairs; checked before any is decoded."""
    total = 0
    for shape, itemsize in shapes_dtypes:
        if not isinstance(shape, (list, tuple)) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0
                                                       for d in shape):
            raise ArtifactError(f"storage meta declares an invalid tensor shape {shape!r}")
        total += math.prod(shape) * itemsize
    return total


def _zstd(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(compress(data)), dtype=torch.uint8)


def _unzstd(t: torch.Tensor, size: int) -> np.ndarray:
    return np.frombuffer(decompress(t.numpy().tobytes(), size), dtype=np.uint8)


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """(numel, itemsize) uint8 view of ``t``'s raw bytes."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).reshape(flat.numel(), flat.element_size()).numpy()


CARD_DEPTH = 5  # card -> storage -> meta -> tensors -> name: the indentation of a layout entry's fields


def _header_entry(name: str, dtype: str, shape: list[int], nbytes: int) -> int:
    """Approximate bytes of one tensor's entry in a safetensors header."""
    return len(json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [10**7, 10**7 + nbytes]}}))


def _overhead(name: str, t: torch.Tensor, info: dict, sparse_info: dict, mask: int, values: int) -> int:
    """Extra header and card bytes of storing ``name`` as mask + values rather than dense."""
    header = (_header_entry(f"{PREFIX}{name}::mask", "U8", [mask], mask)
              + _header_entry(f"{PREFIX}{name}::values", "U8", [values], values)
              - _header_entry(name, "F32", list(t.shape), t.numel() * t.element_size()))
    card = [json.dumps(i, indent=2, sort_keys=True) for i in (sparse_info, {**info, "layout": "dense"})]
    return header + len(card[0]) - len(card[1]) + 2 * CARD_DEPTH * (card[0].count("\n") - card[1].count("\n"))


def encode(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, t in state.items():
        if name.startswith(PREFIX):
            raise ArtifactError(f"state dict key {name!r} clashes with the {CODEC} codec's own names")
        info = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if t.numel() and t.dtype != torch.bool:
            raw = _as_bytes(t)
            nonzero = raw.any(axis=1)
            mask = _zstd(np.packbits(nonzero).tobytes())
            values = _zstd(np.ascontiguousarray(raw[nonzero].T).tobytes())
            sparse_info = {**info, "layout": "bitmask+values", "nonzeros": int(nonzero.sum())}
            extra = _overhead(name, t, info, sparse_info, mask.numel(), values.numel())
            if mask.numel() + values.numel() + extra < raw.size:
                tensors[f"{PREFIX}{name}::mask"] = mask
                tensors[f"{PREFIX}{name}::values"] = values
                layout[name] = sparse_info
                continue
        tensors[name] = t
        layout[name] = {**info, "layout": "dense"}
    return tensors, {"tensors": layout, "compression": f"zstd-{LEVEL}", "value_bytes": "byte planes"}


def decode(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    layout = meta.get("tensors")
    if not isinstance(layout, dict):
        raise ArtifactError(f"{CODEC} storage meta has no tensor layout")
    if not all(isinstance(info, dict) for info in layout.values()):
        raise ArtifactError(f"{CODEC} storage meta: every tensor's layout must be an object")
    check_bytes(declared_bytes((i.get("shape"), 8) for i in layout.values() if i.get("layout") != "dense"),
                f"decoding the {CODEC} tensors", ArtifactError)
    state = {}
    for name, info in layout.items():
        if info.get("layout") == "dense":
            if name not in tensors:
                raise ArtifactError(f"tensor {name!r} is missing")
            state[name] = tensors[name]
            continue
        dtype = getattr(torch, str(info.get("dtype")), None)
        if not isinstance(dtype, torch.dtype) or info.get("layout") != "bitmask+values":
            raise ArtifactError(f"tensor {name!r} has an unknown dtype or layout in the card")
        shape, nnz = [int(s) for s in info["shape"]], int(info["nonzeros"])
        numel, itemsize = math.prod(shape), torch.empty(0, dtype=dtype).element_size()
        if not 0 <= nnz <= numel:
            raise ArtifactError(f"tensor {name!r}: {nnz} non-zeros cannot fit in {numel} elements")
        if f"{PREFIX}{name}::mask" not in tensors or f"{PREFIX}{name}::values" not in tensors:
            raise ArtifactError(f"tensor {name!r} is missing")
        nonzero = np.unpackbits(_unzstd(tensors[f"{PREFIX}{name}::mask"], -(-numel // 8)), count=numel).astype(bool)
        if int(nonzero.sum()) != nnz:
            raise ArtifactError(f"tensor {name!r}: its bitmask does not match its non-zero count")
        values = _unzstd(tensors[f"{PREFIX}{name}::values"], nnz * itemsize).reshape(itemsize, nnz).T
        raw = np.zeros((numel, itemsize), dtype=np.uint8)
        raw[nonzero] = values
        state[name] = torch.from_numpy(raw.reshape(-1)).view(dtype).reshape(shape).clone()
    return state


register_codec(CODEC, encode, decode)
