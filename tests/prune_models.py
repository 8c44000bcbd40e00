"""A small model with a residual addition, a concatenation and a flatten -> linear transition,
importable as a user factory (``slimfuse.zoo.user_model("prune_models:residual_concat")``;
pytest puts tests/ on sys.path)."""

import torch
import torch.nn.functional as F
from torch import nn


class ResidualConcat(nn.Module):
    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 8, side: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.branch1 = nn.Conv2d(width, width, 1)
        self.branch2 = nn.Conv2d(width, width, 3, padding=1)
        self.mix = nn.Conv2d(2 * width, width, 1)
        self.fc = nn.Linear(width * (side // 2) ** 2, 32)
        self.out = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        branches = torch.cat([F.relu(self.branch1(x)), F.relu(self.branch2(x))], dim=1)  # concatenation
        x = x + self.mix(branches)  # residual addition
        x = F.max_pool2d(F.relu(x), 2).flatten(1)  # flatten -> linear
        return self.out(F.relu(self.fc(x)))


def residual_concat(**kwargs) -> nn.Module:
    return ResidualConcat(**kwargs)
