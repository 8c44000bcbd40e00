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
