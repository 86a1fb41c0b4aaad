"""Data shared by the generative model tests (tests/test_models_vae_draw.py,
tests/test_models_generative_runs.py)."""

import torch


def binary_images(n: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    templates = (torch.rand(3, 1, size, size, generator=generator) > 0.5).float()
    flips = (torch.rand(n, 1, size, size, generator=generator) < 0.05).float()
    return (templates[torch.arange(n) % 3] - flips).abs()
