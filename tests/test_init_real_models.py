"""data_dependent_init on models as researchers write them: submodules kept in eval mode, forwards that take a
dict or several inputs, batches of the wrong dtype or device, Atari frames, tuple outputs, user hooks and an
optimizer built before the init."""

import pytest
import torch
from torch import nn

from wn_rl import data_dependent_init, weight_norm


class ActorCritic(nn.Module):
    """Atari-style: uint8 frames converted inside, a shared body, a (logits, {"value": ...}) output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 8, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))
        self.dropout = nn.Dropout(0.5)
        self.policy = nn.Linear(16, 6)
        self.value = nn.Linear(16, 1)

    def forward(self, frames):
        hidden = self.dropout(torch.relu(self.body(frames.float() / 255)))
        return self.policy(hidden), {"value": self.value(hidden)}


def _frames(n=64):
    return torch.randint(0, 256, (n, 4, 16, 16), dtype=torch.uint8)


def test_every_submodule_keeps_its_own_training_mode():
    model = weight_norm(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2)))
    model.train()
    model[1].eval()  # a frozen batch norm in a model that trains
    data_dependent_init(model, torch.randn(64, 4))
    assert model.training and not model[1].training and model[3].training


class DictObservation(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Linear(4, 8)
        self.vector = nn.Linear(3, 8)

    def forward(self, observation):
        return self.image(observation["image"]) + self.vector(observation["vector"])


def test_a_dict_batch_the_forward_takes_whole_is_explained_and_passed_wrapped():
    model = weight_norm(DictObservation())
    batch = {"image": torch.randn(64, 4), "vector": torch.randn(64, 3)}
    with pytest.raises(TypeError, match=r"model\(\*\*batch\).*forward\(observation\).*pass \(batch,\)"):
        data_dependent_init(model, batch)
    assert not bool(model.image.initialized)
    assert len(data_dependent_init(model, (batch,)).layers) == 2


def test_a_tuple_batch_for_a_forward_of_one_argument_is_explained():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, inputs):
            observation, hidden = inputs
            return self.fc(observation) + hidden

    with pytest.raises(TypeError, match=r"its 2 items as positional arguments.*Recurrent.forward\(inputs\)"):
        data_dependent_init(Recurrent(), (torch.randn(8, 4), torch.zeros(8, 8)))


@pytest.mark.parametrize(
    ("batch", "described"),
    [
        (torch.randn(64, 4, dtype=torch.float64), "float64 on cpu"),
        (torch.randint(0, 255, (64, 4), dtype=torch.uint8), "uint8 on cpu"),
        (torch.randn(64, 4, device="meta"), "float32 on meta"),
    ],
)
def test_a_batch_of_another_dtype_or_device_is_explained_and_the_model_unchanged(batch, described):
    model = weight_norm(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    state = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"the batch holds {described}; the model's parameters are float32 on cpu"):
        data_dependent_init(model, batch)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[key])


class ScalesInPlace(nn.Module):
    """Scales its frames in place, which an integer batch cannot hold."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, frames):
        return self.fc(frames.div_(255))


@pytest.mark.parametrize(
    ("model", "shape"),
    [  # what torch 2.13 says, in its words
        (nn.Sequential(nn.Conv2d(4, 2, 3), nn.Flatten()), (8, 4, 4, 4)),  # "Input type (unsigned char) and bias type"
        (nn.Sequential(nn.Conv2d(4, 2, 3, bias=False), nn.Flatten()), (8, 4, 4, 4)),  # "expected scalar type Byte"
        (nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 2)), (8, 4, 4, 4)),  # "not implemented for 'Byte'"
        (nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)), (8, 4)),  # "mixed dtype (CPU)"
        (nn.Linear(4, 2, bias=False), (8, 4)),  # "expected m1 and m2 to have the same dtype"
        (ScalesInPlace(), (8, 4)),  # "result type Float can't be cast to the desired output type Byte"
    ],
    ids=["conv", "conv-without-bias", "pool", "layer-norm", "linear-without-bias", "in-place"],
)
def test_torchs_dtype_errors_on_a_uint8_batch_carry_the_hint_and_the_original_error(model, shape):
    frames = torch.randint(0, 255, shape, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"the batch holds uint8 on cpu; the model's parameters are float32") as info:
        data_dependent_init(weight_norm(model), frames)
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error stays in the traceback


def test_another_error_on_a_uint8_batch_carries_no_dtype_hint():
    class CheckedFrames(ActorCritic):
        def forward(self, frames):
            if frames.shape[1] != 3:
                raise RuntimeError(f"expected RGB frames, got {frames.shape[1]} channels")
            return super().forward(frames)

    with pytest.raises(RuntimeError, match=r"^expected RGB frames, got 4 channels$") as info:
        data_dependent_init(weight_norm(CheckedFrames()), _frames())
    assert info.value.__cause__ is None


def test_uint8_frames_tuple_outputs_no_grad_and_user_hooks():
    model = weight_norm(ActorCritic())
    calls = []
    model.policy.register_forward_hook(lambda layer, inputs, output: calls.append(output.shape))
    with torch.no_grad():
        report = data_dependent_init(model, _frames())
    assert [layer.name for layer in report.layers] == ["body.0", "body.3", "policy", "value"]
    assert len(calls) == 1 and len(model.policy._forward_hooks) == 1  # the user's hook ran, and stays
    logits, _ = model.eval()(_frames(256))
    torch.testing.assert_close(logits.std(0), torch.ones(6), atol=0.3, rtol=0)


def test_an_optimizer_built_before_the_init_trains_the_initialised_parameters():
    model = weight_norm(ActorCritic())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(_frames(8))[0].sum().backward()
    optimizer.step()  # Adam state exists for every parameter
    data_dependent_init(model, _frames())
    initialised = model.policy.g.detach().clone()
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}
    optimizer.zero_grad()
    model(_frames(8))[0].sum().backward()
    optimizer.step()
    assert int(optimizer.state[model.policy.g]["step"]) == 2
    assert not torch.equal(model.policy.g, initialised)
