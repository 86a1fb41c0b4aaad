"""wn_stats / wn_histograms: g, ||v|| and g/||v|| per layer."""

import torch
from torch import nn

import wn_rl


def test_stats_report_g_v_norm_and_gradient_scale():
    net = nn.Sequential(wn_rl.WNLinear(3, 4), nn.ReLU(), wn_rl.WNLinear(4, 2, scale="exp"))
    with torch.no_grad():
        net[0].g.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        net[0].v.copy_(torch.ones(4, 3) * 2)
        net[2].s.fill_(0.0)
    stats = wn_rl.wn_stats(net)
    assert stats["wn/0/g_mean"] == 2.5 and stats["wn/0/g_max"] == 4.0
    assert abs(stats["wn/0/v_norm_mean"] - 2 * 3**0.5) < 1e-5
    assert abs(stats["wn/0/grad_scale_min"] - 1 / (2 * 3**0.5)) < 1e-6
    assert abs(stats["wn/2/g_mean"] - 1.0) < 1e-6
    hist = wn_rl.wn_histograms(nn.ModuleDict({"cell": wn_rl.WNLSTMCell(2, 3)}))
    assert hist["wn/cell.ih/g"].shape == (12,) and "wn/cell.hh/grad_scale" in hist
    assert wn_rl.wn_stats(nn.Linear(2, 2)) == {}
