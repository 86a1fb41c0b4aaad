"""IAF with masked WN layers: the autoregressive structure holds and the log-determinant the flow
reports equals a brute-force log|det| of its Jacobian (float64, small inputs)."""

from __future__ import annotations

import pytest
import torch

import wn_rl
from wn_rl.models.comparison import FIVE
from wn_rl.models.iaf import IAF, MADE, ConvARNet, IAFStep, MaskedWNLinear, conv_ar_mask, linear_ar_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _perturb(module: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Move the weights away from their small initial values so the test sees a non-trivial flow."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


@pytest.mark.parametrize("parameterization", ["normal", "weight_norm"])
def test_made_outputs_depend_only_on_earlier_inputs(parameterization):
    torch.manual_seed(0)
    made = MADE(5, 3, [12, 12], parameterization).double()
    _perturb(made, 0.3)
    z, h = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    for output in (0, 1):
        jacobian = torch.autograd.functional.jacobian(lambda z, out=output: made(z, h)[out], z).reshape(5, 5)
        assert torch.all(jacobian.triu() == 0)  # d out_i / d z_j = 0 for j >= i
        assert jacobian.tril(-1).abs().sum() > 0  # and the allowed connections are used
    context_jacobian = torch.autograd.functional.jacobian(lambda h: made(z, h)[0], h).reshape(5, 3)
    assert torch.all(context_jacobian.abs().sum(dim=1) > 0)  # every output sees the context


@pytest.mark.parametrize("parameterization", FIVE)
def test_iaf_log_det_equals_brute_force_on_vectors(parameterization):
    torch.manual_seed(1)
    flow = IAF.for_vectors(4, 3, [16, 16], 3, parameterization).double()
    _perturb(flow, 0.2)
    h = torch.randn(1, 3, dtype=torch.float64)
    for _ in range(3):
        z = torch.randn(1, 4, dtype=torch.float64)
        jacobian = torch.autograd.functional.jacobian(lambda z: flow(z, h)[0], z).reshape(4, 4)
        _, log_det = flow(z, h)
        torch.testing.assert_close(log_det[0], torch.linalg.slogdet(jacobian)[1], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("parameterization", ["normal", "weight_norm"])
def test_conv_iaf_is_autoregressive_in_raster_order_and_its_log_det_is_exact(parameterization):
    torch.manual_seed(2)
    flow = IAF.for_maps(2, 3, [8], 1, parameterization).double()
    _perturb(flow, 0.2)
    z = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    h = torch.randn(1, 3, 3, 3, dtype=torch.float64)

    def raster(t: torch.Tensor) -> torch.Tensor:  # (row, column, channel) order
        return t.permute(0, 2, 3, 1).reshape(-1)

    jacobian = torch.autograd.functional.jacobian(lambda z: raster(flow(z, h)[0]), z).permute(0, 1, 3, 4, 2)
    jacobian = jacobian.reshape(18, 18)
    assert torch.all(jacobian.triu(1) == 0)  # triangular in raster order
    _, log_det = flow(z, h)
    torch.testing.assert_close(log_det[0], torch.linalg.slogdet(jacobian)[1], atol=1e-9, rtol=1e-9)
    two_steps = IAF.for_maps(2, 3, [8], 2, parameterization).double()  # second step reverses the order
    _perturb(two_steps, 0.1)
    jacobian = torch.autograd.functional.jacobian(lambda z: two_steps(z, h)[0], z).reshape(18, 18)
    torch.testing.assert_close(two_steps(z, h)[1][0], torch.linalg.slogdet(jacobian)[1], atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("reverse", [False, True])
def test_conv_iaf_step_reads_the_context_at_its_own_position(reverse):
    torch.manual_seed(3)
    step = IAFStep(ConvARNet(2, 3, [8], "weight_norm"), reverse=reverse).double()
    _perturb(step, 0.2)
    z = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    h = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    moved = h.clone()
    moved[:, :, 0, 0] += 5.0  # change the context in the top-left corner only
    changed = (step(z, moved)[0] - step(z, h)[0]).abs().sum(dim=(0, 1)) > 0
    # two 3x3 layers: the context at (0, 0) reaches outputs within 2 pixels of (0, 0), in either order
    assert changed[0, 0] and not changed[3:].any() and not changed[:, 3:].any()


def test_conv_mask_centre_follows_channel_degrees_and_context_is_free():
    degrees_in = torch.tensor([0, 1, 2])
    degrees_out = torch.tensor([1, 2])
    mask = conv_ar_mask(3, degrees_in, degrees_out, strict=True, free_inputs=torch.tensor([0]))
    assert mask[:, 1:, 0].eq(1).all() and mask[:, 1:, 1, 0].eq(1).all()  # rows above, left of centre
    assert mask[:, 1:, 2].eq(0).all() and mask[:, 1:, 1, 2].eq(0).all()  # below, right of centre
    torch.testing.assert_close(mask[:, :, 1, 1], linear_ar_mask(degrees_in, degrees_out, strict=True))
    assert mask[:, 0].eq(1).all()  # the context channel is seen everywhere
    with pytest.raises(ValueError, match="odd kernel"):
        conv_ar_mask(2, degrees_in, degrees_out, strict=True)


def test_masked_wn_weight_is_normalised_over_the_kept_entries_and_ddi_works():
    mask = linear_ar_mask(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 2, 3]), strict=False)
    layer = MaskedWNLinear(3, 4, mask)
    weight = layer.weight
    assert torch.all(weight[mask == 0] == 0)
    torch.testing.assert_close(weight.norm(dim=1), layer.g.detach())  # ||w|| = g, the WN invariant
    x = torch.randn(256, 3)
    wn_rl.data_dependent_init(layer, x)
    out = layer(x)
    torch.testing.assert_close(out.std(dim=0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    assert torch.all(layer.weight[mask == 0] == 0)


def test_a_large_masked_layer_keeps_its_mask_on_the_cpu_fast_path():
    """A big fp32 WNLinear on a CPU scales its outputs instead of materialising w, multiplying by v itself. The
    MNIST VAE's MADE (hidden 320, batch 100) is that big: its masked layers must still apply their mask, in a
    training forward and inside ``cached`` with and without gradients, or the flow is not autoregressive."""
    torch.manual_seed(0)
    degrees = torch.arange(320) % 7
    layer = MaskedWNLinear(320, 320, linear_ar_mask(degrees, degrees, strict=True))
    _perturb(layer, 0.1)
    x = torch.randn(100, 320)  # fewer input elements than weights: the fast path's regime
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    with wn_rl.cached(layer):
        torch.testing.assert_close(layer(x), expected)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected)


def test_the_paper_sized_made_is_autoregressive_in_float32():
    torch.manual_seed(0)
    made = MADE(32, 64, [320, 320], "weight_norm")
    _perturb(made, 0.05)
    z, h = torch.randn(100, 32), torch.randn(100, 64)
    jacobian = torch.autograd.functional.jacobian(lambda z: made(z, h)[0][0], z)[:, 0, :]
    assert torch.all(jacobian.triu() == 0)  # d out_i / d z_j = 0 for j >= i
    assert jacobian.tril(-1).abs().sum() > 0


def test_conv_ar_net_shapes_and_arguments():
    net = ConvARNet(4, 2, [8, 8])
    m, s = net(torch.randn(3, 4, 5, 5), torch.randn(3, 2, 5, 5))
    assert m.shape == s.shape == (3, 4, 5, 5)
    with pytest.raises(ValueError, match="hidden layers"):
        ConvARNet(4, 2, [])
