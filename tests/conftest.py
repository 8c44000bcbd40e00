import os
import sys

# Intel MKL chooses kernels by memory alignment, so two identical runs can differ in the last bits: on an
# Intel AMX machine 1 straight `slimfuse run` in 8 trained different weights, and the kill/resume tests,
# which compare separate processes bit for bit, failed at that rate. MKL's conditional numerical
# reproducibility mode removes it (22 of 22 runs identical). It doubles batch-1 matmul time there, so
# slimfuse leaves it to users (docs/reliability.md); the tests, untimed, set it before torch loads MKL,
# and every command they start inherits it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# Keras 3 models in the tests run on the torch backend (the one installed); slimfuse reads any backend's.
os.environ.setdefault("KERAS_BACKEND", "torch")

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
