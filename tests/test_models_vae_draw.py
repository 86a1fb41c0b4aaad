"""The generative models of sections 5.2-5.3 (the convolutional VAE with IAF, the ResNet VAE, DRAW): each
trains in every parameterization; the ELBO is finite and, averaged over many samples, a lower bound on the
exact log-likelihood of models small enough to integrate numerically; DRAW computes its weights once per
sequence; the distributions, free bits and the Polyak average."""

from __future__ import annotations

import math

import pytest
import torch
from generative_helpers import binary_images as _binary_images  # tests/generative_helpers.py

import wn_rl
from wn_rl.models.cifar_vae import ResNetVAE
from wn_rl.models.comparison import FIVE
from wn_rl.models.distributions import (
    bernoulli_log_likelihood,
    discretized_logistic_log_likelihood,
    gaussian_kl_standard_normal,
    log_normal,
)
from wn_rl.models.draw import DRAW, filterbank
from wn_rl.models.generative_experiment import free_bits_kl
from wn_rl.models.training import PolyakAverage
from wn_rl.models.vae import ConvVAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _tiny_vae(parameterization: str, posterior: str, z_dim: int = 4) -> ConvVAE:
    return ConvVAE(
        parameterization,
        image_size=8,
        widths=(4, 8, 8),
        blocks_per_stage=1,
        dense=16,
        z_dim=z_dim,
        posterior=posterior,
        iaf_hidden=(16,),
        context_dim=4,
    )


def _tiny_draw(parameterization: str, steps: int = 3, z_dim: int = 2) -> DRAW:
    return DRAW(
        parameterization, image_size=(6, 6), steps=steps, read_n=2, write_n=3, enc_hidden=8, dec_hidden=8, z_dim=z_dim
    )


def _mean_elbo(model: torch.nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    torch.manual_seed(123)
    with torch.no_grad():
        return float(model.elbo(x.repeat(repeats, *([1] * (x.dim() - 1)))).mean())


def _trains(model: torch.nn.Module, x: torch.Tensor, lr: float, steps: int) -> tuple[float, float]:
    before = _mean_elbo(model, x)
    optimizer = torch.optim.Adamax(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = -model.elbo(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, _mean_elbo(model, x)


@pytest.mark.parametrize("posterior", ["diagonal", "iaf"])
@pytest.mark.parametrize("parameterization", FIVE)
def test_conv_vae_trains_in_every_parameterization(parameterization, posterior):
    torch.manual_seed(0)
    x = _binary_images(48, 8, seed=1)
    model = _tiny_vae(parameterization, posterior)
    wn_rl.data_dependent_init(model, x)
    before, after = _trains(model, x, lr=0.01, steps=15)
    assert math.isfinite(after) and after > before + 2.0, (before, after)  # nats per 8x8 image


def _quadrature_log_px(log_px_given_z, limit: float = 6.0, points: int = 101) -> torch.Tensor:
    """log p(x) = log int N(z; 0, I) p(x|z) dz for a 2-D latent, by a Riemann sum on a grid (float64).
    (On these models 161 points instead of 101 change the result by < 1e-4 nats.)"""
    grid = torch.linspace(-limit, limit, points, dtype=torch.float64)
    z = torch.cartesian_prod(grid, grid)
    log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(dim=1)
    return torch.logsumexp(log_px_given_z(z) + log_prior[:, None], dim=0) + 2 * math.log(float(grid[1] - grid[0]))


def _log_px_given_z(decode, x: torch.Tensor):
    def fn(z: torch.Tensor) -> torch.Tensor:
        logits = decode(z)
        return torch.stack(
            [bernoulli_log_likelihood(xi.expand_as(logits), logits).flatten(1).sum(dim=1) for xi in x], dim=1
        )

    return fn


@pytest.mark.parametrize("posterior", ["diagonal", "iaf"])
def test_vae_elbo_is_a_lower_bound_on_the_exact_log_likelihood(posterior):
    """With z in 2-D, log p(x) is computed by quadrature. Tolerances: the mean ELBO over 10,000
    posterior samples must not exceed log p(x) by more than 3 standard errors, and the
    importance-weighted estimate from the same samples must match log p(x) within 0.25 nats, which
    checks that log q (with the IAF log-determinant) and log p are normalised correctly. (After a
    few training steps the weights are heavy-tailed: 5,000-sample estimates scatter by ~0.3 nats
    around log p(x), 50,000-sample ones land within 0.08.)"""
    torch.manual_seed(0)
    data = torch.bernoulli(torch.rand(64, 1, 8, 8), generator=torch.Generator().manual_seed(2)).double()
    model = _tiny_vae("weight_norm", posterior, z_dim=2).double()
    wn_rl.data_dependent_init(model, data)
    _trains(model, data, lr=2e-3, steps=20)
    model.eval()
    x = data[:3]
    with torch.no_grad():
        log_px = _quadrature_log_px(_log_px_given_z(model.decode, x))
        log_w = model.log_weights(x, 10_000)
    elbo, standard_error = log_w.mean(dim=0), log_w.std(dim=0) / math.sqrt(10_000)
    assert torch.isfinite(log_w).all()
    assert torch.all(elbo <= log_px + 3 * standard_error), (elbo, log_px)
    importance_weighted = torch.logsumexp(log_w, dim=0) - math.log(10_000)
    torch.testing.assert_close(importance_weighted, log_px, atol=0.25, rtol=0)
    decoded, decode = [], model.decode  # the bound in chunks: never more than max_images decoded at once
    model.decode = lambda z: decoded.append(len(z)) or decode(z)
    with torch.no_grad():
        chunked = model.importance_weighted_bound(x, 10_000, max_images=3_000)
    assert max(decoded) == 3_000 and sum(decoded) == 30_000
    torch.testing.assert_close(chunked, log_px, atol=0.25, rtol=0)


@pytest.mark.parametrize("parameterization", FIVE)
def test_resnet_vae_trains_in_every_parameterization(parameterization):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (2, 3, 8, 8), generator=generator).repeat(12, 1, 1, 1)
    x = levels.float() * 2 / 255 - 1
    model = ResNetVAE(parameterization, image_size=8, hidden=8, z_channels=2, context=4, stages=(1, 1))
    wn_rl.data_dependent_init(model, x)
    before, after = _trains(model, x, lr=0.01, steps=15)
    assert math.isfinite(after) and after > before + 10.0, (before, after)
    assert model.bits_per_dim(torch.tensor([after])).item() < model.bits_per_dim(torch.tensor([before])).item()
    assert model.sample(2).shape == (2, 3, 8, 8)
    assert model.latent_units == [2 * 4 * 4, 2 * 2 * 2]


@pytest.mark.parametrize("parameterization", FIVE)
def test_draw_trains_in_every_parameterization(parameterization):
    torch.manual_seed(0)
    x = _binary_images(32, 6, seed=3)
    model = _tiny_draw(parameterization)
    before, after = _trains(model, x, lr=0.02, steps=20)
    assert math.isfinite(after) and after > before + 2.0, (before, after)
    expected = wn_rl.WNLSTMCell if parameterization.startswith("weight_norm") else torch.nn.LSTMCell
    assert isinstance(model.encoder, expected) and isinstance(model.decoder, expected)


@pytest.mark.parametrize("parameterization", ["normal", "weight_norm"])
def test_draw_elbo_is_a_lower_bound_on_the_exact_log_likelihood(parameterization):
    """T = 2 steps of a 1-D latent: log p(x) by quadrature over (z_1, z_2) through the generative
    path ``decode``; the mean ELBO over 2000 samples must not exceed it by more than 3 standard errors."""
    torch.manual_seed(0)
    data = _binary_images(64, 6, seed=4).double()
    model = _tiny_draw(parameterization, steps=2, z_dim=1).double()
    _trains(model, data, lr=0.01, steps=20)
    x = data[:3]
    with torch.no_grad():
        log_px = _quadrature_log_px(_log_px_given_z(lambda z: model.decode(z[:, :, None]), x))
        elbo = model.elbo(x.repeat(2000, 1, 1, 1)).view(2000, 3)
    mean, standard_error = elbo.mean(dim=0), elbo.std(dim=0) / math.sqrt(2000)
    assert torch.isfinite(elbo).all()
    assert torch.all(mean <= log_px + 3 * standard_error), (mean, log_px)


def test_draw_lstms_follow_the_parameterizations_exp_scale():
    model = _tiny_draw(wn_rl.Parameterization.get("weight_norm", scale="exp"))
    assert model.encoder.scale == model.decoder.scale == "exp"
    model.elbo(_binary_images(4, 6, seed=0)).sum().backward()
    assert model.encoder.s_ih.grad.abs().sum() > 0 and model.decoder.s_hh.grad.abs().sum() > 0


def test_draw_computes_effective_weights_once_per_sequence(monkeypatch):
    model = _tiny_draw("weight_norm", steps=5)
    calls = {"lstm": 0, "linear": 0}
    lstm_compute, linear_compute = wn_rl.WNLSTMCell.compute_weights, wn_rl.WNLinear.compute_weight

    def counting_lstm(self):
        calls["lstm"] += 1
        return lstm_compute(self)

    def counting_linear(self):
        calls["linear"] += 1
        return linear_compute(self)

    monkeypatch.setattr(wn_rl.WNLSTMCell, "compute_weights", counting_lstm)
    monkeypatch.setattr(wn_rl.WNLinear, "compute_weight", counting_linear)
    model.elbo(_binary_images(4, 6, seed=0)).sum().backward()
    assert calls == {"lstm": 2, "linear": 4}  # 2 cells and 4 linear layers, not 5 times as many
    assert model.encoder.g_ih.grad is not None and model.write_patch.v.grad is not None


def test_filterbank_rows_are_normalised_gaussians_on_a_grid():
    f = filterbank(torch.tensor([4.0]), torch.tensor([2.0]), torch.tensor([0.5]), n=3, size=9)
    torch.testing.assert_close(f.sum(dim=2), torch.ones(1, 3))
    assert f[0].argmax(dim=1).tolist() == [2, 4, 6]  # centres at g + (i - n/2 - 1/2) delta


def test_discretized_logistic_is_a_distribution_over_256_levels():
    levels = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    for mean, log_scale in [(0.0, -3.0), (0.9, -6.0), (-1.4, -1.0), (0.2, 2.0), (0.3, -9.0)]:
        log_p = discretized_logistic_log_likelihood(
            levels, torch.tensor(mean).double(), torch.tensor(log_scale).double()
        )
        assert torch.isfinite(log_p).all()
        assert abs(float(log_p.exp().sum()) - 1.0) < 1e-4
    mean = torch.zeros(256, requires_grad=True)
    discretized_logistic_log_likelihood(levels.float(), mean, torch.full((256,), -8.0)).sum().backward()
    assert torch.isfinite(mean.grad).all()


def test_gaussian_formulas_agree_with_torch_distributions():
    mean, logsd, x = torch.randn(5), torch.randn(5), torch.randn(5)
    normal = torch.distributions.Normal(mean, logsd.exp())
    torch.testing.assert_close(log_normal(x, mean, logsd), normal.log_prob(x))
    standard = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    torch.testing.assert_close(
        gaussian_kl_standard_normal(mean, logsd), torch.distributions.kl_divergence(normal, standard)
    )


def test_free_bits_and_polyak_average():
    kl = torch.tensor([[0.1, 3.0], [0.3, 5.0]])
    assert float(free_bits_kl(kl, torch.tensor([1.0, 1.0]))) == pytest.approx(1.0 + 4.0)
    model = torch.nn.Linear(2, 1)
    average = PolyakAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    seen = []
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        seen.append(model.weight.detach().clone())
        average.update(model)
    # bias-corrected: the initial weights get no share; the models after updates 1..3 weigh 0.81, 0.9, 1 (/ 2.71)
    expected = (0.81 * seen[0] + 0.9 * seen[1] + seen[2]) / 2.71
    torch.testing.assert_close(average.model.weight, expected)
    assert not torch.allclose(average.model.weight, 0.729 * start + 0.271 * expected)  # not the uncorrected rule
    assert PolyakAverage.decay_for(600, 10) == pytest.approx(1 - 1 / 6000)
