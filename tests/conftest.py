import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/factories.py: user factories by import path

import slimfuse as sf


@pytest.fixture(scope="session")
def digits():
    return sf.datasets.load("digits")


@pytest.fixture(scope="session")
def mnist():
    return sf.datasets.load("mnist5k")


@pytest.fixture(scope="session")
def digits_mlp(digits):
    """A small MLP trained on digits (a few seconds), shared by tests that only read it."""
    torch.manual_seed(0)
    return sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[64]), digits, epochs=8)
