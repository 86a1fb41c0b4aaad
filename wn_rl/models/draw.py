"""DRAW (Gregor et al. 2015) with read/write attention, as used in section 5.3 of the paper.

At each of T steps, with canvas c_(t-1) and x_hat = x - sigmoid(c_(t-1)):

    r_t = read(x, x_hat, h_dec_(t-1))                   (N_r x N_r Gaussian filterbank glimpses)
    h_enc_t = LSTM_enc([r_t, h_dec_(t-1)])
    z_t ~ q(z_t | h_enc_t) = N(mu(h_enc_t), sigma(h_enc_t))
    h_dec_t = LSTM_dec(z_t)
    c_t = c_(t-1) + write(h_dec_t)                        (N_w x N_w patch through a filterbank)

and p(x | z_1..T) is Bernoulli(sigmoid(c_T)). The ELBO is log p(x|z) - sum_t KL(q(z_t|.) || N(0, I)).
Section 5.3 applies weight normalization to every weight vector: the LSTMs are
:class:`wn_rl.WNLSTMCell` in a WN parameterization and ``nn.LSTMCell`` otherwise, and the whole T-step
loop runs inside :func:`wn_rl.cached`, so every effective weight is computed once per sequence.
All other layers read from LSTM states and are built with ``p.without_norm()``: the paper notes that
batch statistics do not fit a recurrent model, so the parameterizations with a normalisation layer
reduce to their weights here (``batch_norm`` and ``mean_only_bn`` behave as ``normal``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wn_rl.layers import cached
from wn_rl.models.distributions import bernoulli_log_likelihood, gaussian_kl_standard_normal
from wn_rl.parameterization import Parameterization, ParameterizationLike

__all__ = ["DRAW", "filterbank"]


def filterbank(center: Tensor, delta: Tensor, var: Tensor, n: int, size: int) -> Tensor:
    """DRAW's Gaussian filterbank (eq. 19-22 of Gregor et al.): ``(B, n, size)``, rows summing to 1.

    Filter i is centred at ``center + (i - n/2 - 0.5) * delta`` (i = 1..n) with variance ``var``.
    """
    i = torch.arange(1, n + 1, device=center.device, dtype=center.dtype)
    mu = center[:, None] + (i - n / 2 - 0.5) * delta[:, None]  # (B, n)
    a = torch.arange(size, device=center.device, dtype=center.dtype)
    f = torch.exp(-((a[None, None, :] - mu[:, :, None]) ** 2) / (2 * var[:, None, None]))
    return f / f.sum(dim=2, keepdim=True).clamp_min(1e-8)


class _Attention(nn.Module):
    """Maps a decoder state to an n x n filterbank on a height x width image (eq. 21-24)."""

    def __init__(self, p: Parameterization, hidden: int, n: int, height: int, width: int) -> None:
        super().__init__()
        self.params = p.linear(hidden, 5)
        self.n, self.height, self.width = n, height, width

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(F_y, F_x, log_gamma)``."""
        gx_, gy_, log_var, log_delta_, log_gamma = self.params(h).unbind(dim=1)
        gx = (self.width + 1) / 2 * (gx_ + 1)
        gy = (self.height + 1) / 2 * (gy_ + 1)
        delta = (max(self.height, self.width) - 1) / max(self.n - 1, 1) * torch.exp(log_delta_)
        var = torch.exp(log_var)
        return (
            filterbank(gy, delta, var, self.n, self.height),
            filterbank(gx, delta, var, self.n, self.width),
            log_gamma,
        )


class DRAW(nn.Module):
    """DRAW with attention for single-channel images (MNIST) in any parameterization.

    Args:
        parameterization: ``weight_norm`` (and ``weight_norm+mean_only_bn``) use weight-normalized
            LSTMs and layers; the others plain ones (see the module docstring).
        image_size: ``(height, width)``.
        steps: T, the number of glimpses (jbornschein/draw, used by the paper: 64).
        read_n, write_n: attention window sizes (2 and 5 there).
        enc_hidden, dec_hidden, z_dim: LSTM sizes and latent size per step (256, 256, 100 there).
    """

    def __init__(
        self,
        parameterization: ParameterizationLike = "weight_norm",
        *,
        image_size: tuple[int, int] = (28, 28),
        steps: int = 64,
        read_n: int = 2,
        write_n: int = 5,
        enc_hidden: int = 256,
        dec_hidden: int = 256,
        z_dim: int = 100,
    ) -> None:
        super().__init__()
        if min(steps, read_n, write_n, enc_hidden, dec_hidden, z_dim, *image_size) < 1:
            raise ValueError(
                f"DRAW sizes must be positive: steps={steps}, read_n={read_n}, write_n={write_n}, "
                f"hidden=({enc_hidden}, {dec_hidden}), z_dim={z_dim}, image_size={image_size}"
            )
        p = Parameterization.get(parameterization).without_norm()
        self.height, self.width = image_size
        self.steps, self.z_dim, self.dec_hidden, self.enc_hidden = steps, z_dim, dec_hidden, enc_hidden
        self.read_n, self.write_n = read_n, write_n
        self.read_attention = _Attention(p, dec_hidden, read_n, self.height, self.width)
        self.encoder = p.lstm_cell(2 * read_n * read_n + dec_hidden, enc_hidden)
        self.posterior = p.linear(enc_hidden, 2 * z_dim, init_scale=0.1)
        self.decoder = p.lstm_cell(z_dim, dec_hidden)
        self.write_attention = _Attention(p, dec_hidden, write_n, self.height, self.width)
        self.write_patch = p.linear(dec_hidden, write_n * write_n, init_scale=0.1)
        self.canvas0 = nn.Parameter(torch.zeros(self.height, self.width))

    def _read(self, x: Tensor, x_hat: Tensor, h_dec: Tensor) -> Tensor:
        fy, fx, log_gamma = self.read_attention(h_dec)
        glimpse = torch.stack([x, x_hat], dim=1)  # (B, 2, H, W)
        r = fy[:, None] @ glimpse @ fx[:, None].transpose(-1, -2)  # (B, 2, n, n)
        return (r * log_gamma.exp()[:, None, None, None]).flatten(1)

    def _write(self, h_dec: Tensor) -> Tensor:
        fy, fx, log_gamma = self.write_attention(h_dec)
        patch = self.write_patch(h_dec).view(-1, self.write_n, self.write_n)
        return (fy.transpose(1, 2) @ patch @ fx) * torch.exp(-log_gamma)[:, None, None]

    def elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p(x|z), kl)``: shapes ``(N,)`` and ``(N, T)`` (analytic KL per step). ``x`` is
        ``(N, 1, H, W)`` or ``(N, H, W)`` with values in {0, 1}."""
        x = x.reshape(x.shape[0], self.height, self.width)
        batch = x.shape[0]
        h_enc = c_enc = x.new_zeros(batch, self.enc_hidden)
        h_dec = c_dec = x.new_zeros(batch, self.dec_hidden)
        canvas = self.canvas0.expand(batch, -1, -1)
        kls = []
        with cached(self):  # effective LSTM and linear weights: once per sequence, not once per step
            for _ in range(self.steps):
                x_hat = x - torch.sigmoid(canvas)
                r = self._read(x, x_hat, h_dec)
                h_enc, c_enc = self.encoder(torch.cat([r, h_dec], dim=1), (h_enc, c_enc))
                mean, logsd = self.posterior(h_enc).chunk(2, dim=1)
                z = mean + logsd.exp() * torch.randn_like(mean)
                kls.append(gaussian_kl_standard_normal(mean, logsd).sum(dim=1))
                h_dec, c_dec = self.decoder(z, (h_dec, c_dec))
                canvas = canvas + self._write(h_dec)
        log_px_z = bernoulli_log_likelihood(x, canvas).flatten(1).sum(dim=1)
        return log_px_z, torch.stack(kls, dim=1)

    def elbo(self, x: Tensor) -> Tensor:
        """Per-example ELBO in nats."""
        log_px_z, kl = self.elbo_terms(x)
        return log_px_z - kl.sum(dim=1)

    def decode(self, z: Tensor) -> Tensor:
        """Canvas logits for latent sequences ``z`` of shape ``(N, T, z_dim)``: the generative model."""
        batch = z.shape[0]
        h_dec = c_dec = z.new_zeros(batch, self.dec_hidden)
        canvas = self.canvas0.expand(batch, -1, -1)
        with cached(self):
            for t in range(self.steps):
                h_dec, c_dec = self.decoder(z[:, t], (h_dec, c_dec))
                canvas = canvas + self._write(h_dec)
        return canvas

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images of Bernoulli means, shape ``(n, 1, H, W)``."""
        z = torch.randn(n, self.steps, self.z_dim, device=self.canvas0.device)
        return torch.sigmoid(self.decode(z))[:, None]

    def forward(self, x: Tensor) -> Tensor:
        return self.elbo(x)
