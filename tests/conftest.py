"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run a test on one intra-op thread. Tests share a small CPU with other processes; with several
    threads on busy cores each step of a small network waits on the slowest thread (measured on the
    2-core CI machine: 0.04 s -> 2 s per step of a small conv net), and OpenMP threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
