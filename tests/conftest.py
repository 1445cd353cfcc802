"""Shared fixtures: small slices of real Fashion-MNIST and a tiny synthetic problem."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never touch the network: a missing dataset must fail, not start a download.
os.environ["CAAT_OFFLINE"] = "1"

# Two cores on CI: keep torch from oversubscribing when tests run beside Ray workers.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fmnist():
    """The full real Fashion-MNIST (CPU tensors), loaded once per test session."""
    from trainables.config import DatasetConfig
    from trainables.data import load

    return load(DatasetConfig(name="fashion_mnist"))


@pytest.fixture(scope="session")
def fmnist_small(fmnist):
    """A 4000/1000 slice of real Fashion-MNIST, same format as the full set."""
    from dataclasses import replace

    return replace(fmnist, train_x=fmnist.train_x[:4000], train_y=fmnist.train_y[:4000],
                   test_x=fmnist.test_x[:1000], test_y=fmnist.test_y[:1000])


@pytest.fixture
def float64():
    """torch's default dtype float64 for one test: the reference-equivalence tests compare
    the project's methods with transcriptions of their official code to 1e-5 and below."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
