"""Peer models: the structural patterns users' own networks have, each a tiny importable class.

Organised by pattern, as Torch-Pruning's own structural tests are (residual add, concatenation,
split, tuple-output split, grouped/depthwise convolution, multi-input, multi-output, attention,
embeddings + LSTM, ConvTranspose, a customised layer with its own parameter), plus a plain-torch
set shaped like what a Keras user writes (Sequential stacks, BatchNorm1d/Dropout, LayerNorm/GELU,
GRU, Conv1d, squeeze-excitation). Every one takes the 8x8 ``digits`` images (or their pixels as
tokens, :func:`digits_tokens`) and has a few thousand parameters, so it trains in a second.

Every class is ``@slimfuse.zoo.rebuildable`` (its constructor arguments are recorded), so it
saves and reloads with ``trust_factory=True`` as a user's own model does. ``PEERS`` lists them
for the model matrix (``tests/peer_matrix.py``): a new model is one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import slimfuse as sf

# --------------------------------------------------------------------------- structural patterns


@sf.zoo.rebuildable
class ResidualAdd(nn.Module):
    """conv -> bn, then ``h + bn(conv(h))``: the two addends' channels must be pruned together."""

    def __init__(self, width: int = 12, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(h + self.bn1(self.conv(h)))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


@sf.zoo.rebuildable
class Concat(nn.Module):
    """Two branches concatenated along channels, mixed by a 1x1 convolution."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.a = nn.Conv2d(width, width, 1)
        self.b = nn.Conv2d(width, width, 3, padding=1)
        self.mix = nn.Conv2d(2 * width, width, 1)
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = torch.cat([F.relu(self.a(h)), F.relu(self.b(h))], dim=1)
        return self.head(F.avg_pool2d(F.relu(self.mix(h)), 2).flatten(1))


@sf.zoo.rebuildable
class Split(nn.Module):
    """``torch.split`` of one convolution's channels into two branches (Torch-Pruning's ``test_split``):
    the sizes are read from the branches, so they follow a pruning."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 2 * width, 3, padding=1)
        self.bn = nn.BatchNorm2d(2 * width)
        self.left = nn.Conv2d(width, width, 1)
        self.right = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(2 * width * 16, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        a, b = torch.split(h, [self.left.in_channels, self.right.in_channels], dim=1)
        h = torch.cat([F.relu(self.left(a)), F.relu(self.right(b))], dim=1)
        return self.head(F.avg_pool2d(h, 2).flatten(1))


class Halves(nn.Module):
    """A layer whose output is a tuple: the two halves of its input's channels."""

    def forward(self, x):
        return tuple(x.chunk(2, dim=1))


@sf.zoo.rebuildable
class TupleSplit(nn.Module):
    """A submodule returning a tuple (``chunk``) whose parts feed different layers."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 2 * width, 3, padding=1)
        self.halves = Halves()
        self.gate = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        a, b = self.halves(F.relu(self.stem(x)))
        h = a * torch.sigmoid(self.gate(b))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


@sf.zoo.rebuildable
class GroupedConv(nn.Module):
    """A grouped convolution (``groups=4``): channels are pruned group by group."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.bn(self.grouped(h)))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


@sf.zoo.rebuildable
class Depthwise(nn.Module):
    """A MobileNet block: depthwise 3x3 (``groups=channels``), pointwise 1x1, BatchNorm."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.bn1 = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width * 16, classes)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.bn1(self.dw(h)))
        h = F.relu(self.bn2(self.pw(h)))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


@sf.zoo.rebuildable
class MultiInput(nn.Module):
    """Two inputs: the image and a side vector (here: the image's row means)."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.side = nn.Linear(8, width)
        self.head = nn.Linear(width * 16 + width, classes)

    def forward(self, image, side):
        h = F.avg_pool2d(F.relu(self.conv(image)), 2).flatten(1)
        return self.head(torch.cat([h, F.relu(self.side(side))], dim=1))


@sf.zoo.rebuildable
class MultiOutput(nn.Module):
    """Two heads: class logits and an auxiliary reconstruction, returned as a tuple."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.body = nn.Linear(64, width)
        self.head = nn.Linear(width, classes)
        self.aux = nn.Linear(width, 64)

    def forward(self, x):
        h = F.relu(self.body(x.flatten(1)))
        return self.head(h), self.aux(h)


@sf.zoo.rebuildable
class Attention(nn.Module):
    """``nn.MultiheadAttention`` over the image's 8 rows as tokens (learned positions), a residual, mean pooling."""

    def __init__(self, dim: int = 16, heads: int = 2, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(8, dim))  # learned row positions (a bare parameter)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.embed(x.flatten(1, 2)) + self.pos  # (N, 8 rows, 8 pixels) -> (N, 8, dim)
        a, _ = self.attn(t, t, t, need_weights=False)
        return self.head(self.norm(t + a).mean(1))


@sf.zoo.rebuildable
class EmbeddingLSTM(nn.Module):
    """Token ids (pixel intensities 0..16, :func:`digits_tokens`) -> Embedding -> LSTM -> last state."""

    def __init__(self, vocab: int = 17, dim: int = 8, hidden: int = 24, classes: int = 10):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim * 8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids):
        e = self.emb(ids).flatten(2)  # (N, 8 rows, 8 pixels * dim): one step per image row
        _, (h, _) = self.lstm(e)
        return self.head(h[-1])


@sf.zoo.rebuildable
class ConvTranspose(nn.Module):
    """Down by a strided convolution, up by ``ConvTranspose2d``, added to the input features."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + F.relu(self.up(F.relu(self.down(h))))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


class ChannelScale(nn.Module):
    """A customised layer: its own learnable per-channel scale, no torch layer inside."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


@sf.zoo.rebuildable
class CustomLayer(nn.Module):
    """A conv net with a user layer holding a bare ``nn.Parameter`` on the channel axis."""

    def __init__(self, width: int = 12, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.scale = ChannelScale(width)
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        h = F.relu(self.scale(self.conv(x)))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


@sf.zoo.rebuildable
class SqueezeExcite(nn.Module):
    """Channel attention: the features times ``sigmoid(fc(pool(features)))``."""

    def __init__(self, width: int = 12, reduced: int = 4, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc1 = nn.Linear(width, reduced)
        self.fc2 = nn.Linear(reduced, width)
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        h = F.relu(self.conv(x))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
        h = h * w[:, :, None, None]
        return self.head(F.avg_pool2d(h, 2).flatten(1))


# --------------------------------------------------------------------------- plain stacks (the Keras habit)


@sf.zoo.rebuildable
class SequentialCNN(nn.Sequential):
    """``nn.Sequential`` conv / BatchNorm / ReLU / MaxPool / Flatten / Dropout / Linear (a Keras Sequential)."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.1),
            nn.Linear(2 * width * 16, classes))


@sf.zoo.rebuildable
class DenseBN(nn.Module):
    """Dense -> BatchNorm1d -> ReLU -> Dropout, twice, then the classifier."""

    def __init__(self, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, hidden), nn.BatchNorm1d(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.drop(F.relu(self.bn1(self.fc1(x.flatten(1)))))
        h = self.drop(F.relu(self.bn2(self.fc2(h))))
        return self.out(h)


@sf.zoo.rebuildable
class LayerNormGELU(nn.Module):
    """A transformer-style feed-forward block: LayerNorm, GELU, a residual around the MLP."""

    def __init__(self, dim: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(64, dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x.flatten(1))
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.head(h)


@sf.zoo.rebuildable
class GRURows(nn.Module):
    """A GRU reading the image row by row."""

    def __init__(self, hidden: int = 24, classes: int = 10):
        super().__init__()
        self.gru = nn.GRU(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        _, h = self.gru(x.flatten(1, 2))
        return self.head(h[-1])


@sf.zoo.rebuildable
class Conv1dRows(nn.Module):
    """``Conv1d`` over the rows (pixels of a row as channels), global max pooling."""

    def __init__(self, width: int = 24, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv1d(8, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = x.flatten(1, 2).transpose(1, 2)  # (N, 8 pixels as channels, 8 rows)
        h = F.relu(self.conv2(F.relu(self.conv1(h))))
        return self.head(h.amax(2))


@sf.zoo.rebuildable
class TokenBag(nn.Module):
    """Token ids -> Embedding -> flatten -> Linear: the teacher/student the token models are paired with."""

    def __init__(self, vocab: int = 17, dim: int = 8, classes: int = 10):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(64 * dim, classes)

    def forward(self, ids):
        return self.head(self.emb(ids).flatten(1))


# --------------------------------------------------------------------------- data and the list


def digits_tokens(digits: sf.Splits) -> sf.Splits:
    """``digits`` as token ids: each pixel's intensity 0..16 (the data set's own levels), shape (8, 8)."""
    def ids(s: sf.Split) -> sf.Split:
        return sf.Split((s.x[:, 0] * 16).round().long(), s.y)

    task = sf.Task("digits-tokens", "classification", digits.task.num_classes, (8, 8), digits.task.class_names)
    return sf.Splits(ids(digits.train), ids(digits.val), ids(digits.test), task)


@dataclass(frozen=True)
class Peer:
    name: str
    pattern: str
    build: type  # a class (or factory) called with no arguments
    data: str = "digits"  # "digits" (images, 1x8x8 floats), "tokens" (8x8 int64 ids) or "sequence" (64 ids)
    epochs: int = 8  # training epochs of the baseline
    lr: float = 3e-3
    feed: Callable | None = None  # x -> the model's inputs, when it takes several (the tests' own calls)

    def inputs(self, x: torch.Tensor) -> tuple:
        return self.feed(x) if self.feed is not None else (x,)


def image_and_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two inputs of :class:`MultiInput`: the image and its row means."""
    return x, x.mean(-1).flatten(1)


PEERS: list[Peer] = [
    Peer("residual-add", "residual addition", ResidualAdd),
    Peer("concat", "concatenation", Concat),
    Peer("split", "torch.split into branches", Split),
    Peer("tuple-split", "tuple-output submodule (chunk)", TupleSplit),
    Peer("grouped-conv", "grouped convolution (groups=4)", GroupedConv),
    Peer("depthwise", "depthwise-separable convolution", Depthwise),
    Peer("multi-input", "two inputs (image, side vector)", MultiInput, feed=image_and_rows),
    Peer("multi-output", "two outputs (logits, reconstruction)", MultiOutput),
    Peer("attention", "nn.MultiheadAttention", Attention, epochs=12, lr=1e-2),
    Peer("embedding-lstm", "Embedding + LSTM on token ids", EmbeddingLSTM, data="tokens"),
    Peer("conv-transpose", "ConvTranspose2d", ConvTranspose),
    Peer("custom-layer", "user layer with its own nn.Parameter", CustomLayer),
    Peer("squeeze-excite", "channel attention (multiplication)", SqueezeExcite),
    Peer("sequential-cnn", "nn.Sequential conv stack", SequentialCNN),
    Peer("dense-bn", "Linear + BatchNorm1d + Dropout", DenseBN),
    Peer("layernorm-gelu", "LayerNorm + GELU + residual MLP", LayerNormGELU),
    Peer("gru", "GRU over rows", GRURows),
    Peer("conv1d", "Conv1d over rows", Conv1dRows),
]


# --------------------------------------------------------------------------- transformers models (built offline)


def hf_bert() -> nn.Module:
    """A tiny ``BertForSequenceClassification`` over the digits' pixels as a 64-token sequence."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=17, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager"))


def hf_resnet() -> nn.Module:
    """A tiny ``ResNetForImageClassification`` (basic residual blocks, BatchNorm) on the 1x8x8 digits."""
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(
        num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        num_labels=10, downsample_in_first_stage=False))


def hf_convnext() -> nn.Module:
    """A tiny ``ConvNextForImageClassification`` (patchify stem, depthwise 7x7, LayerNorm, GELU, layer scale)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(ConvNextConfig(
        num_channels=1, patch_size=2, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=8,
        num_labels=10))


def hf_gpt2() -> nn.Module:
    """A tiny ``GPT2ForSequenceClassification`` (Conv1D attention, causal, read at the last token) over the
    digits' pixels as a 64-token sequence; its padding id is one the pixels never take."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    return GPT2ForSequenceClassification(GPT2Config(
        vocab_size=18, n_positions=64, n_embd=32, n_layer=2, n_head=4, num_labels=10, pad_token_id=17,
        bos_token_id=17, eos_token_id=17, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager"))


def digits_sequence(digits: sf.Splits) -> sf.Splits:
    """``digits`` as one sequence of 64 token ids per image (the pixel levels 0..16), as text models take them."""
    tokens = digits_tokens(digits)

    def flat(s: sf.Split) -> sf.Split:
        return sf.Split(s.x.flatten(1), s.y)

    task = sf.Task("digits-sequence", "classification", digits.task.num_classes, (64,), digits.task.class_names)
    return sf.Splits(flat(tokens.train), flat(tokens.val), flat(tokens.test), task)


HF_PEERS: list[Peer] = [
    Peer("hf-bert", "transformers BertForSequenceClassification", hf_bert, data="sequence", epochs=20),
    Peer("hf-resnet", "transformers ResNetForImageClassification", hf_resnet),
    Peer("hf-convnext", "transformers ConvNextForImageClassification", hf_convnext),
    Peer("hf-gpt2", "transformers GPT2ForSequenceClassification", hf_gpt2, data="sequence", epochs=12),
]


# --------------------------------------------------------------------------- Keras 3 models (translated to torch)


def _keras_seeded():
    """Keras, its initialisers seeded from torch's seed (set by the caller), so a peer builds the same each run."""
    import keras

    keras.utils.set_random_seed(torch.initial_seed() % 2**31)
    return keras


def keras_cnn():
    """A Keras ``Sequential`` CNN on channels-last images: Conv2D / BatchNormalization / MaxPooling2D /
    Flatten / Dropout / Dense, as a Keras user writes it."""
    keras = _keras_seeded()
    from keras import layers

    return keras.Sequential([
        keras.Input((8, 8, 1)), layers.Conv2D(8, 3, padding="same", activation="relu"), layers.BatchNormalization(),
        layers.MaxPooling2D(), layers.Conv2D(16, 3, padding="same", activation="relu"), layers.Flatten(),
        layers.Dropout(0.1), layers.Dense(10)])


def keras_functional():
    """A Keras functional model: a residual Add, a Concatenate, a depthwise convolution, a Flatten into Dense."""
    keras = _keras_seeded()
    from keras import layers

    x = keras.Input((8, 8, 1))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    r = layers.Add()([h, layers.Conv2D(8, 3, padding="same", activation="relu")(h)])
    c = layers.Concatenate()([r, layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)])
    flat = layers.Flatten()(layers.MaxPooling2D()(c))
    return keras.Model(x, layers.Dense(10)(layers.Dense(32, activation="gelu")(flat)))


def digits_nhwc(digits: sf.Splits) -> sf.Splits:
    """``digits`` as channels-last images (N, 8, 8, 1), as Keras models take them."""
    def nhwc(s: sf.Split) -> sf.Split:
        return sf.Split(s.x.permute(0, 2, 3, 1).contiguous(), s.y)

    task = sf.Task("digits-nhwc", "classification", digits.task.num_classes, (8, 8, 1), digits.task.class_names)
    return sf.Splits(nhwc(digits.train), nhwc(digits.val), nhwc(digits.test), task)


KERAS_PEERS: list[Peer] = [
    Peer("keras-cnn", "Keras 3 Sequential CNN", keras_cnn, data="nhwc"),
    Peer("keras-functional", "Keras 3 functional (Add, Concatenate, depthwise)", keras_functional, data="nhwc",
         epochs=12),
]
