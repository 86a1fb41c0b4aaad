"""The drop-ins for nn.LSTM, nn.GRU and nn.RNN (wn_rl.recurrent): what weight_norm / remove_weight_norm do to
a torch stack, packed sequences, torch's init, dropout, input checks, pickling, ``cached``, ``torch.compile``,
models that hold a stack, the Parameterization builders and cuDNN."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from recurrent_helpers import F64  # tests/recurrent_helpers.py
from recurrent_helpers import assert_same as _assert_same
from recurrent_helpers import padded as _padded
from recurrent_helpers import state as _state
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import wn_rl
from wn_rl import (
    WNGRU,
    WNLSTM,
    WNRNN,
    WNGRUCell,
    WNLSTMCell,
    WNRNNCellBase,
    cached,
    remove_weight_norm,
    weight_norm,
)

STACKS = [
    (nn.LSTM, WNLSTM, {}),
    (nn.LSTM, WNLSTM, {"proj_size": 3}),  # h = W_hr (o * tanh(c)): a third weight, (3, hidden)
    (nn.GRU, WNGRU, {}),
    (nn.RNN, WNRNN, {"nonlinearity": "relu"}),
]
STACK_IDS = ["lstm", "lstm_proj", "gru", "rnn_relu"]
# (num_layers, bidirectional, batch_first, bias)
SHAPES = [(1, False, False, True), (2, True, True, True), (3, False, True, False), (2, True, False, False)]


@pytest.mark.parametrize(("plain_cls", "wn_cls", "kwargs"), STACKS, ids=STACK_IDS)
@pytest.mark.parametrize(("layers", "bidirectional", "batch_first", "bias"), SHAPES)
@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_converting_a_torch_stack_keeps_its_outputs_and_folding_gives_it_back(
    plain_cls, wn_cls, kwargs, layers, bidirectional, batch_first, bias, scale
):
    torch.manual_seed(0)
    plain = plain_cls(5, 7, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, **kwargs)
    plain = plain.to(F64)
    converted = weight_norm(copy.deepcopy(plain), scale=scale)
    assert type(converted) is wn_cls and converted.scale == scale
    assert (converted.num_layers, converted.bidirectional, converted.batch_first, converted.bias) == (
        layers,
        bidirectional,
        batch_first,
        bias,
    )
    assert len(converted.cells) == layers * (2 if bidirectional else 1)
    x = _padded(batch_first)
    hx = _state(plain_cls, (layers * (2 if bidirectional else 1), 4, 7), proj_size=plain.proj_size)
    _assert_same(converted(x, hx), plain(x, hx))
    _assert_same(converted(x), plain(x))
    unbatched = x[0] if batch_first else x[:, 0]
    _assert_same(converted(unbatched), plain(unbatched))
    for name, _ in plain.named_parameters():  # nn.LSTM's names read the effective weights and the biases
        torch.testing.assert_close(getattr(converted, name), getattr(plain, name))

    folded = remove_weight_norm(converted)
    assert type(folded) is plain_cls
    assert {n: p.shape for n, p in folded.named_parameters()} == {n: p.shape for n, p in plain.named_parameters()}
    _assert_same(folded(x, hx), plain(x, hx))


@pytest.mark.parametrize(("plain_cls", "wn_cls", "kwargs"), STACKS, ids=STACK_IDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequences_give_the_torch_outputs_and_final_states(
    plain_cls, wn_cls, kwargs, bidirectional, enforce_sorted
):
    """Sequences of different lengths: each keeps its state once it ends; backward in time each starts from
    its own h_0 at its last step; h_n comes back in the caller's batch order."""
    torch.manual_seed(0)
    plain = plain_cls(5, 7, 2, batch_first=True, bidirectional=bidirectional, **kwargs).to(F64)
    converted = weight_norm(copy.deepcopy(plain))
    assert type(converted) is wn_cls
    lengths = torch.tensor([6, 4, 3, 1]) if enforce_sorted else torch.tensor([3, 6, 1, 4])
    packed = pack_padded_sequence(_padded(True), lengths, batch_first=True, enforce_sorted=enforce_sorted)
    hx = _state(plain_cls, (2 * (2 if bidirectional else 1), 4, 7), proj_size=plain.proj_size)
    for state in (hx, None):
        got, expected = converted(packed, state), plain(packed, state)
        assert torch.equal(got[0].batch_sizes, expected[0].batch_sizes)
        _assert_same(got, expected)
        padded_got, _ = pad_packed_sequence(got[0], batch_first=True)
        padded_expected, _ = pad_packed_sequence(expected[0], batch_first=True)
        torch.testing.assert_close(padded_got, padded_expected)


@pytest.mark.parametrize(("plain_cls", "wn_cls", "kwargs"), STACKS, ids=STACK_IDS)
def test_a_fresh_stack_starts_from_the_torch_init_and_trains_every_cell(plain_cls, wn_cls, kwargs):
    """torch's init, U(-1/sqrt(hidden), 1/sqrt(hidden)) for every weight and bias (a projection's too), drawn
    in torch's order: the same seed gives the torch module's weights."""
    torch.manual_seed(0)
    stack = wn_cls(3, 4, 2, bidirectional=True, **kwargs)
    torch.manual_seed(0)
    for name, param in plain_cls(3, 4, 2, bidirectional=True, **kwargs).named_parameters():
        assert getattr(stack, name).shape == param.shape
        assert getattr(stack, name).abs().max() <= 4**-0.5
        torch.testing.assert_close(getattr(stack, name), param)
    out, _ = stack(torch.randn(5, 2, 3))
    assert out.shape == (5, 2, 2 * kwargs.get("proj_size", 4))
    out.square().sum().backward()
    for name, param in stack.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_stack_computes_each_effective_weight_once_per_call():
    torch.manual_seed(0)
    stack = WNGRU(3, 4, 2, bidirectional=True)
    calls = {"n": 0}
    original = torch._weight_norm

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    torch._weight_norm = counting
    try:
        stack(torch.randn(9, 2, 3))
    finally:
        torch._weight_norm = original
    assert calls["n"] == 2 * len(stack.cells)  # weight_ih and weight_hh of each cell, not per time step
    assert all(cell._cached_weights is None for cell in stack.cells)


def test_bias_names_are_the_parameters_themselves():
    """A forget-gate bias set through nn.LSTM's name takes effect (common LSTM init)."""
    lstm = WNLSTM(3, 4)
    assert lstm.bias_hh_l0 is lstm.cells[0].bias_hh
    with torch.no_grad():
        lstm.bias_ih_l0[4:8].fill_(1.0)
    assert torch.all(lstm.cells[0].bias_ih[4:8] == 1.0)
    with pytest.raises(AttributeError):
        lstm.weight_ih_l1  # noqa: B018  one layer only
    with pytest.raises(AttributeError):
        lstm.weight_ih_l0_reverse  # noqa: B018  not bidirectional
    with pytest.raises(AttributeError):
        lstm.no_such_thing  # noqa: B018
    lstm.flatten_parameters()  # what code written for nn.LSTM calls; nothing to flatten


def test_dropout_acts_between_layers_in_training_only():
    torch.manual_seed(0)
    plain = nn.GRU(3, 4, 2, dropout=0.5)
    converted = weight_norm(copy.deepcopy(plain))
    assert converted.dropout == 0.5
    x = torch.randn(5, 2, 3)
    converted.train()
    first, second = converted(x)[0], converted(x)[0]
    assert not torch.allclose(first, second)
    converted.eval()
    plain.eval()
    _assert_same(converted(x), plain(x))


def test_a_torch_stack_with_a_numpy_layer_count_converts_and_folds():
    """nn.LSTM takes num_layers=np.int64(2) (a count drawn with numpy in a sweep); weight_norm raised
    'num_layers=np.int64(2) must be a positive integer' on it."""
    torch.manual_seed(0)
    plain = nn.LSTM(3, 4, num_layers=np.int64(2))
    x = torch.randn(5, 2, 3)
    converted = weight_norm(copy.deepcopy(plain))
    assert type(converted) is WNLSTM and converted.num_layers == 2 and type(converted.num_layers) is int
    _assert_same(converted(x), plain(x))
    _assert_same(remove_weight_norm(converted)(x), plain(x))
    assert WNGRU(np.int64(3), np.int32(4), np.int64(2)).cell(1, False).input_size == 4
    with pytest.raises(ValueError, match=r"num_layers=True must be a positive integer"):
        WNGRU(3, 4, True)
    with pytest.raises(ValueError, match=r"hidden_size=4\.0 must be a positive integer"):
        WNGRU(3, 4.0)


def test_stack_inputs_are_checked_with_messages_that_say_what_fits():
    lstm = WNLSTM(3, 4, 2, batch_first=True)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, L, 3\).*got \(2, 5, 6\)"):
        lstm(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"h_0 has shape \(1, 2, 4\), expected \(2, 2, 4\)"):
        lstm(torch.randn(2, 5, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match=r"expects hx = \(h_0, c_0\)"):
        lstm(torch.randn(2, 5, 3), (torch.zeros(2, 2, 4),))
    with pytest.raises(ValueError, match="at least one step"):
        lstm(torch.randn(2, 0, 3))
    with pytest.raises(ValueError, match=r"c_0 has shape"):
        WNLSTM(3, 4)(torch.randn(5, 3), (torch.zeros(1, 4), torch.zeros(2, 4)))  # unbatched: (layers, hidden)
    with pytest.raises(ValueError, match=r"h_0 has shape \(1, 2, 4\), expected \(1, 2, 2\)"):  # h is projected
        WNLSTM(3, 4, proj_size=2)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="num_layers=0"):
        WNGRU(3, 4, 0)
    with pytest.raises(ValueError, match=r"dropout=1\.5"):
        WNRNN(3, 4, dropout=1.5)
    assert weight_norm(nn.LSTM(3, 4, 2, dropout=1.0)).dropout == 1.0  # torch takes it, so the conversion does


def test_folding_leaves_a_subclassed_stack_whole_with_its_cells():
    class Peephole(WNLSTM):  # a user's variant whose forward relies on its WN cells
        pass

    model = nn.ModuleDict({"lstm": Peephole(3, 4), "head": wn_rl.WNLinear(4, 2)})
    x = torch.randn(5, 2, 3)
    expected = model["lstm"](x)
    with pytest.warns(UserWarning, match=r"\['lstm \(Peephole\)'\] unchanged"):
        remove_weight_norm(model)
    assert type(model["lstm"]) is Peephole and type(model["lstm"].cells[0]) is WNLSTMCell
    _assert_same(model["lstm"](x), expected)
    assert type(model["head"]) is nn.Linear


def test_frozen_recurrent_weights_stay_frozen_through_conversion_and_folding():
    lstm = nn.LSTM(3, 4, 2)
    lstm.weight_hh_l1.requires_grad_(False)
    lstm.bias_ih_l0.requires_grad_(False)
    converted = weight_norm(lstm)
    assert not converted.cell(1).v_hh.requires_grad and not converted.cell(1).g_hh.requires_grad
    assert not converted.cell(0).bias_ih.requires_grad and converted.cell(0).v_ih.requires_grad
    folded = remove_weight_norm(converted)
    frozen = {name for name, p in folded.named_parameters() if not p.requires_grad}
    assert frozen == {"weight_hh_l1", "bias_ih_l0"}


@pytest.mark.parametrize("scale", ["linear", "exp"])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_stack_pickle_deepcopy_and_state_dict_round_trip(scale, proj_size):
    torch.manual_seed(0)
    stack = WNLSTM(3, 4, 2, bidirectional=True, scale=scale, proj_size=proj_size)
    with torch.no_grad():
        for cell in stack.cells:
            for p in cell.scale_parameters():
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, 2, 3)
    expected = stack(x)
    for clone in (pickle.loads(pickle.dumps(stack)), copy.deepcopy(stack)):
        _assert_same(clone(x), expected)
    torch.manual_seed(1)
    fresh = WNLSTM(3, 4, 2, bidirectional=True, scale=scale, proj_size=proj_size)
    fresh.load_state_dict(stack.state_dict())
    _assert_same(fresh(x), expected, rtol=0, atol=0)


def test_wn_lstm_pickled_before_bidirectional_existed_still_runs():
    """SB3 recurrent policies saved whole (torch.save) hold WNLSTMs from before the option: one direction."""
    torch.manual_seed(0)
    lstm = WNLSTM(3, 4, 2)
    state = lstm.__getstate__()
    del state["bidirectional"]
    old = WNLSTM.__new__(WNLSTM)
    old.__setstate__(state)
    x = torch.randn(5, 2, 3)
    _assert_same(old(x), lstm(x))


def test_models_with_recurrent_stacks_convert_initialise_and_report():
    """A DRQN-style model: conv torso, nn.LSTM, linear head. After weight_norm the torso and head get
    data-dependent init, the LSTM keeps its weights (section 3), and wn_stats reports every cell."""

    class DRQN(nn.Module):
        def __init__(self):
            super().__init__()
            self.torso = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, frames):  # (N, L, 1, 8, 8)
            n, steps = frames.shape[:2]
            features = self.torso(frames.flatten(0, 1)).view(n, steps, -1)
            return self.head(self.lstm(features)[0])

    torch.manual_seed(0)
    model = DRQN()
    frames = torch.randn(16, 5, 1, 8, 8)
    expected = model(frames)
    weight_norm(model)
    assert isinstance(model.lstm, WNLSTM)
    torch.testing.assert_close(model(frames), expected)
    lstm_before = copy.deepcopy(model.lstm.state_dict())
    wn_rl.data_dependent_init(model, frames)
    assert all(torch.equal(lstm_before[k], v) for k, v in model.lstm.state_dict().items())
    head_out = model(frames)
    torch.testing.assert_close(head_out.mean((0, 1)), torch.zeros(3), atol=1e-4, rtol=0)
    stats = wn_rl.wn_stats(model)
    assert {"wn/lstm.cells.0.ih/g_mean", "wn/lstm.cells.0.hh/g_mean", "wn/head/g_mean"} <= set(stats)
    assert isinstance(model.lstm.cells[0], WNRNNCellBase)


def test_cached_around_a_stack_and_its_nested_loop_keeps_gradients():
    torch.manual_seed(0)
    stack = WNGRU(3, 4)
    x = torch.randn(4, 2, 3)
    with cached(stack):
        with torch.no_grad():
            stack(x)  # acting: weights cached without a graph
        stack(x)[0].sum().backward()  # training in the same block recomputes them with one
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_with_a_stack_matches_eager_and_trains(backend):
    """torch.compile runs the recurrent kernel eagerly, as it runs nn.LSTM's (Dynamo's allow_rnn is off;
    inductor fails on the CPU's kernel), and compiles the rest, effective weights included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    stack = WNLSTM(3, 4, 2, batch_first=True)
    x = torch.randn(2, 5, 3)

    def forward(x):
        return stack(model(x))[0].square().mean()

    expected = forward(x)
    torch._dynamo.reset()
    got = torch.compile(forward, backend=backend)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters())


@pytest.mark.parametrize("name", ["normal", "weight_norm", "weight_norm+mean_only_bn", "layer_norm", "batch_norm"])
def test_parameterization_builds_recurrent_layers_with_weight_norm_or_plain(name):
    p = wn_rl.Parameterization.get(name)
    built = {
        "lstm_cell": p.lstm_cell(3, 4),
        "gru_cell": p.gru_cell(3, 4),
        "lstm": p.lstm(3, 4, 2, batch_first=True),
        "gru": p.gru(3, 4, 2, bidirectional=True),
        "projected_lstm": p.lstm(3, 4, proj_size=2),
    }
    wn = {"lstm_cell": WNLSTMCell, "gru_cell": WNGRUCell, "lstm": WNLSTM, "gru": WNGRU, "projected_lstm": WNLSTM}
    plain = {
        "lstm_cell": nn.LSTMCell,
        "gru_cell": nn.GRUCell,
        "lstm": nn.LSTM,
        "gru": nn.GRU,
        "projected_lstm": nn.LSTM,
    }
    for kind, module in built.items():
        assert type(module) is (wn if p.weight_norm else plain)[kind], kind  # never a norm layer
    assert built["lstm"].batch_first and built["gru"].bidirectional and built["gru"].num_layers == 2
    assert built["projected_lstm"].proj_size == 2
    if p.weight_norm:
        assert built["gru"].scale == p.scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("proj_size", [0, 3])
def test_cuda_stack_runs_cudnn_with_the_effective_weights(proj_size):
    """On a GPU the kernel is cuDNN's: the converted LSTM matches nn.LSTM, trains, says nothing about copying
    its (computed) weights into cuDNN's buffer, and runs under autocast."""
    torch.manual_seed(0)
    plain = nn.LSTM(5, 7, 2, batch_first=True, bidirectional=True, proj_size=proj_size).cuda()
    converted = weight_norm(copy.deepcopy(plain))
    x = torch.randn(4, 6, 5, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = converted(x)
    _assert_same(got, plain(x), rtol=1e-4, atol=1e-5)
    got[0].square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in converted.parameters())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = converted(x)
    assert torch.isfinite(out.float()).all()
