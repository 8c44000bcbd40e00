"""The built-in ``sentences`` data set: an English corpus slimfuse generates itself, and its tokenizer.

``corpus(n, seed)`` writes ``n`` distinct sentences over eight topics from templates and
per-topic vocabulary (short statements, questions, long compound sentences), the same
sentences for the same seed. ``load("sentences")`` tokenizes them with the MiniLM WordPiece
tokenizer into a :class:`Splits` whose ``x`` are token ids (int64, padded with 0) and whose
``y`` is the topic, so embedding models can be measured without labels (fidelity to a
reference) and with them (nearest-centroid topic accuracy).

Tokenizing needs the optional ``nlp`` extra (``pip install 'slimfuse[nlp]'``).
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch

from ..data.core import Splits, Task, split_arrays
from ..errors import ConfigError, DataError

MAX_POSITIONS = 512  # BERT's position table: longer inputs have no position embedding

_TOPICS = {
    "sports": {
        "who": ["the striker", "our goalkeeper", "the young sprinter", "the home team", "a veteran coach",
                "the tennis champion", "the relay squad", "the captain"],
        "did": ["scored in the final minute", "won the championship", "trained through the winter",
                "lost the semi-final", "broke the national record", "signed a new contract", "missed the penalty"],
        "what": ["the match", "the marathon", "the league season", "the cup final", "the training camp",
                 "the transfer window"],
        "how": ["after extra time", "in front of a sold-out stadium", "despite a knee injury", "on a muddy pitch"],
    },
    "cooking": {
        "who": ["the chef", "my grandmother", "the baker", "a home cook", "the pastry team", "the line cook"],
        "did": ["roasted the vegetables", "baked fresh sourdough", "simmered the tomato sauce", "burned the garlic",
                "whisked the eggs", "seasoned the soup", "sliced the onions thinly"],
        "what": ["the risotto", "the bread dough", "the curry", "the chocolate cake", "the pasta", "the marinade"],
        "how": ["with a pinch of salt", "over a low flame", "for forty minutes", "in a cast iron pan"],
    },
    "technology": {
        "who": ["the engineer", "our startup", "the security team", "a data scientist", "the chip maker",
                "the open source community"],
        "did": ["released a software update", "fixed the memory leak", "trained a larger model",
                "patched the vulnerability", "shipped the new laptop", "migrated the database", "rewrote the compiler"],
        "what": ["the smartphone", "the cloud service", "the neural network", "the web browser", "the server cluster",
                 "the operating system"],
        "how": ["before the deadline", "with fewer bugs", "on cheaper hardware", "after months of testing"],
    },
    "weather": {
        "who": ["the forecaster", "the weather service", "the farmers", "the coastal towns", "the ski resort"],
        "did": ["warned of heavy rain", "expected a cold front", "reported record heat", "saw the first snow",
                "measured strong winds", "predicted a dry summer", "recorded a thunderstorm"],
        "what": ["the storm", "the heatwave", "the fog", "the hurricane season", "the frost", "the drought"],
        "how": ["overnight", "across the northern valleys", "for the third day in a row", "along the coast"],
    },
    "finance": {
        "who": ["the central bank", "investors", "the hedge fund", "the accountant", "the retail bank",
                "the finance minister"],
        "did": ["raised interest rates", "sold their shares", "reported higher profits", "cut the budget",
                "issued new bonds", "lowered inflation forecasts", "bought government debt"],
        "what": ["the stock market", "the currency", "the quarterly earnings", "the mortgage rates",
                 "the pension fund", "the tax reform"],
        "how": ["after a volatile week", "despite weak demand", "in early trading", "ahead of the elections"],
    },
    "travel": {
        "who": ["the tourists", "a backpacker", "the airline", "our tour guide", "the cruise ship", "the travellers"],
        "did": ["booked a cheap flight", "missed the last train", "explored the old town", "cancelled the trip",
                "crossed the mountain pass", "checked into the hotel", "lost their luggage"],
        "what": ["the island", "the museum", "the night train", "the national park", "the harbour",
                 "the ancient ruins"],
        "how": ["during the holidays", "on a tight budget", "without a map", "at sunrise"],
    },
    "health": {
        "who": ["the doctor", "the nurse", "the patient", "the hospital", "a nutritionist", "the clinic"],
        "did": ["prescribed antibiotics", "recommended more sleep", "recovered from surgery", "tested a new vaccine",
                "treated the infection", "measured the blood pressure", "advised a healthier diet"],
        "what": ["the flu", "the therapy", "the clinical trial", "the headache", "the vitamin supplements",
                 "the physiotherapy"],
        "how": ["within two weeks", "with mild side effects", "under close supervision", "after the check-up"],
    },
    "music": {
        "who": ["the band", "the pianist", "a young composer", "the orchestra", "the singer", "the drummer"],
        "did": ["released a new album", "played a sold-out concert", "recorded a live session", "wrote a ballad",
                "tuned the guitar", "rehearsed the symphony", "cancelled the tour"],
        "what": ["the melody", "the jazz festival", "the opera", "the chorus", "the vinyl record", "the soundtrack"],
        "how": ["in a tiny studio", "with a full choir", "after years of silence", "for a cheering crowd"],
    },
}

_TEMPLATES = [
    "{Who} {did}.",
    "{Who} {did} {how}.",
    "Yesterday {who} {did}.",
    "Did {who} really say that {what} was {adj}?",
    "Everyone agreed that {what} was {adj}.",
    "{What} was {adj}, so {who} {did}.",
    "According to the news, {who} {did} {how}, and {what} was {adj} as a result.",
    "I think {what} is {adj}.",
    "Why was {what} so {adj} this year?",
    "{Who} {did} {how}, although many people thought {what} was {adj} and nobody expected it.",
    "Nobody talked about anything except {what}.",
    "{What}!",
    "When {who} {did}, {what} suddenly seemed {adj}.",
    "{Who} {did} {how}; later {who2} {did2} too.",
]
_ADJ = ["surprising", "disappointing", "wonderful", "expensive", "unusual", "impressive", "controversial",
        "boring", "remarkable", "chaotic"]

TOPICS = tuple(_TOPICS)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def corpus(n: int = 2400, *, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` distinct generated sentences and their topic ids (int64), the same for the same ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the corpus size must be a positive integer, got {n!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    sentences, topics = [], []
    attempts = 0
    while len(sentences) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ConfigError(f"cannot generate {n} distinct sentences (the templates give fewer)")
        t = rng.randrange(len(TOPICS))
        words = _TOPICS[TOPICS[t]]
        fill = {k: rng.choice(v) for k, v in words.items()}
        fill.update(who2=rng.choice(words["who"]), did2=rng.choice(words["did"]), adj=rng.choice(_ADJ))
        fill.update(Who=_cap(fill["who"]), What=_cap(fill["what"]))
        s = rng.choice(_TEMPLATES).format(**fill)
        if s not in seen:
            seen.add(s)
            sentences.append(s)
            topics.append(t)
    return sentences, np.asarray(topics, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("tokenizing needs the nlp extra: pip install 'slimfuse[nlp]'") from None
    from .minilm import package_path

    return Tokenizer.from_file(str(package_path() / "tokenizer.json"))


def tokenize(sentences, *, max_length: int = 128, pad_to: int | None = None) -> torch.Tensor:
    """Token ids (int64, sentences x length) with ``[CLS] ... [SEP]``, truncated to ``max_length``,
    padded with 0 to the longest sentence (or to ``pad_to``)."""
    if isinstance(sentences, str):
        raise DataError("tokenize takes a list of sentences, not one string (wrap it in a list)")
    try:
        sentences = list(sentences)
    except TypeError:
        raise DataError(f"tokenize takes a list of strings, got {type(sentences).__name__}") from None
    if not sentences:
        raise DataError("no sentences to tokenize (the list is empty)")
    bad = next((i for i, s in enumerate(sentences) if not isinstance(s, str)), None)
    if bad is not None:
        raise DataError(f"sentence {bad} is a {type(sentences[bad]).__name__}, not a string")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= MAX_POSITIONS:
        raise ConfigError(f"max_length must be an integer in 2..{MAX_POSITIONS} (the model's positions), "
                          f"got {max_length!r}")
    if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int)
                               or not 2 <= pad_to <= MAX_POSITIONS):
        raise ConfigError(f"pad_to must be an integer in 2..{MAX_POSITIONS}, got {pad_to!r}")
    tok = _tokenizer()
    tok.no_padding()  # the file pads every input to 128 tokens; we pad to the longest
    tok.enable_truncation(max_length)
    ids = [e.ids for e in tok.encode_batch(sentences)]
    width = max(pad_to or 0, max(len(i) for i in ids))
    out = torch.zeros(len(ids), width, dtype=torch.int64)
    for row, seq in zip(out, ids):
        row[: len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
    return out


def sentences(*, n: int = 2400, seed: int = 0, val: float = 0.1, test: float = 0.2,
              max_length: int = 64) -> Splits:
    """The ``sentences`` data set: the generated corpus as token ids, topic labels, stratified splits."""
    text, topics = corpus(n, seed=seed)
    ids = tokenize(text, max_length=max_length).numpy()
    task = Task("sentences", "embedding", len(TOPICS), (ids.shape[1],), TOPICS)
    return split_arrays(ids, topics, task, seed=seed, val=val, test=test)
