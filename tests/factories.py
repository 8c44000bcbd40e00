"""User model factories for tests (imported by name, as a user's package would be)."""

import torch
from torch import nn


class TwoBranch(nn.Module):
    """A user model that is not in the zoo: two branches, concatenated."""

    def __init__(self, in_features: int = 64, classes: int = 10, width: int = 16):
        super().__init__()
        self.flatten = nn.Flatten()
        self.a = nn.Linear(in_features, width)
        self.b = nn.Linear(in_features, width)
        self.out = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.flatten(x)
        return self.out(torch.cat([self.a(x).relu(), self.b(x).tanh()], dim=1))


def two_branch(in_features: int = 64, classes: int = 10, width: int = 16) -> nn.Module:
    return TwoBranch(in_features, classes, width)


MARKER = []


def evil(**kwargs):
    MARKER.append("imported and ran")
    return two_branch()


class TinyAttention(nn.Module):
    """One self-attention block over token ids with a Hugging Face style additive mask (``finfo.min``)."""

    def __init__(self, vocab: int = 50, dim: int = 16, classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, classes)
        self.scale = dim ** -0.5

    def forward(self, ids):
        mask = (ids != 0).float()
        h = self.emb(ids)
        scores = self.q(h) @ self.k(h).transpose(1, 2) * self.scale
        scores = scores + (1.0 - mask[:, None, :]) * torch.finfo(torch.float32).min
        z = torch.softmax(scores, -1) @ self.v(h)
        pooled = (z * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.out(pooled)


def tiny_attention(vocab: int = 50, dim: int = 16, classes: int = 4) -> nn.Module:
    return TinyAttention(vocab, dim, classes)


def token_ids(n: int = 256, length: int = 12, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    """Token ids with 0 as padding at the end of every row (1..length-2 real tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    lengths = torch.randint(2, length - 1, (n,), generator=gen)
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids


class ConvView(nn.Module):
    """A CNN as people write them: conv blocks, then ``x.view(x.size(0), -1)`` before the classifier."""

    def __init__(self, channels: int = 8, classes: int = 10, side: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc = nn.Linear(channels * side * side, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = x.view(x.size(0), -1)
        return self.fc(x)


def conv_view(channels: int = 8, classes: int = 10, side: int = 8) -> nn.Module:
    return ConvView(channels, classes, side)


class AttrReader(nn.Module):
    """A model whose forward reads layer attributes (``kernel_size``, ``in_channels``, ``in_features``)."""

    def __init__(self, channels: int = 8, classes: int = 10, side: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.split = nn.Conv2d(channels, 2 * channels, 1)
        self.fc = nn.Linear(channels * side * side, classes)

    def forward(self, x):
        assert x.shape[1] == self.conv.in_channels
        pad = self.conv.kernel_size[0] // 2 - self.conv.padding[0]  # 0: the conv keeps the size
        x = torch.relu(self.conv(torch.nn.functional.pad(x, (pad,) * 4)))
        a, b = self.split(x).split(self.split.out_channels // 2, dim=1)
        x = (a * torch.sigmoid(b)).flatten(1)
        return self.fc(x.reshape(-1, self.fc.in_features))


def attr_reader(channels: int = 8, classes: int = 10, side: int = 8) -> nn.Module:
    return AttrReader(channels, classes, side)


class TiedLM(nn.Module):
    """Token ids -> next-token logits with the output layer tied to the embedding (GPT-2 style)."""

    def __init__(self, vocab: int = 50, dim: int = 16, tie: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids).mean(1))))


def tied_lm(vocab: int = 50, dim: int = 16, tie: bool = True) -> nn.Module:
    return TiedLM(vocab, dim, tie)


class MHAClassifier(nn.Module):
    """Token ids -> embedding -> Linear -> ``nn.MultiheadAttention`` -> mean over tokens -> MLP."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.proj(self.emb(ids))
        z, _ = self.attn(h, h, h, need_weights=False)
        return self.out(torch.relu(self.hidden(z.mean(1))))


def mha_classifier(vocab: int = 50, dim: int = 32, heads: int = 4, classes: int = 4) -> nn.Module:
    return MHAClassifier(vocab, dim, heads, classes)
