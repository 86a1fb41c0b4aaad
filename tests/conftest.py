"""Shared pytest fixtures, and the ``compiled_functional_call`` marker."""

import hashlib
from types import SimpleNamespace

import pytest
import torch

from agents.dqn.update_mode import COMPILED_UPDATE_TORCH


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "compiled_functional_call: torch.compile of torch.func.functional_call (the compiled DQN update, "
        "the whole-step benchmark); skipped on a torch older than agents.dqn.update_mode.COMPILED_UPDATE_TORCH",
    )


def pytest_runtest_setup(item):
    if item.get_closest_marker("compiled_functional_call") and torch.__version__ < COMPILED_UPDATE_TORCH:
        version = ".".join(map(str, COMPILED_UPDATE_TORCH))
        pytest.skip(
            f"torch.compile traces torch.func.functional_call from torch {version}; this is torch {torch.__version__}"
        )


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


@pytest.fixture
def hashed_bytes(monkeypatch):
    """The chunk sizes every SHA-256 in :mod:`wn_rl.checkpoint` is fed from now on: a pass over a checkpoint
    sums to its size."""
    from wn_rl import checkpoint

    hashed: list[int] = []

    def sha256(*args):
        digest = hashlib.sha256(*args)

        def update(data: bytes) -> None:
            hashed.append(len(data))
            digest.update(data)

        return SimpleNamespace(update=update, hexdigest=digest.hexdigest)

    monkeypatch.setattr(checkpoint, "hashlib", SimpleNamespace(sha256=sha256))
    return hashed


@pytest.fixture
def torch_loads(monkeypatch):
    """``(keyword arguments, payload)`` of every ``torch.load`` in the test, in order (what a loader mapped where)."""
    loads, real_load = [], torch.load

    def load(f, *args, **kwargs):
        payload = real_load(f, *args, **kwargs)
        loads.append((kwargs, payload))
        return payload

    monkeypatch.setattr(torch, "load", load)
    return loads
