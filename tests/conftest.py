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


@pytest.fixture(autouse=True, scope="session")
def sb3_logs_in_pytest_tmp(tmp_path_factory):
    """SB3 models learning without ``tensorboard_log`` create an empty ``SB3-<time>`` folder in the
    system's temp dir on every ``learn()`` (``stable_baselines3.common.logger.configure``), hundreds
    per suite run; ``SB3_LOGDIR`` sends them all to one folder under pytest's own temp dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3_logdir")))
        yield
