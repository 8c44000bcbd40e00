"""A user's own models, in an importable module (as a user's package would hold them)."""

import itertools

import torch
from torch import nn

import slimfuse as sf


@sf.zoo.rebuildable
class Recorded(nn.Module):
    """Keeps none of its arguments as attributes: the decorator records them at construction."""

    def __init__(self, in_features: int, hidden: list[int], classes: int = 10, *, act: str = "relu"):
        super().__init__()
        widths = [in_features, *hidden]
        self.body = nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(widths)])
        self.fn = torch.relu if act == "relu" else torch.tanh
        self.out = nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.body:
            x = self.fn(layer(x))
        return self.out(x)


class Plain(nn.Module):
    """No decorator; keeps its constructor arguments as same-named attributes (the scikit-learn habit)."""

    def __init__(self, in_features: int, width: int = 32, classes: int = 10, bias: bool = True):
        super().__init__()
        self.in_features, self.width, self.classes = in_features, width, classes
        self.fc = nn.Linear(in_features, width, bias=bias)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        return self.out(self.fc(x.flatten(1)).relu())


class Forgetful(nn.Module):
    """Keeps ``width`` nowhere, so nothing can tell how it was built."""

    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.layer = nn.Linear(in_features, width)

    def forward(self, x):
        return self.layer(x.flatten(1))


class Residual(nn.Module):
    """A conv net with a residual addition and BatchNorm: Torch-Pruning must keep the sum consistent."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.channels, self.classes = channels, classes
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = self.stem(x).relu()
        h = h + self.bn(self.conv(h)).relu()
        return self.head(self.pool(h).flatten(1))
