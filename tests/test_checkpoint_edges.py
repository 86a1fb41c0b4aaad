"""Edge cases of checkpoints, dormant units and provenance: values saved that must load with weights_only=True,
names of one prefix that begin another's, directories named like checkpoints, activations near float32's
largest value, a deleted working directory."""

import collections
import enum
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from wn_rl.checkpoint import (
    complete_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_incomplete,
    remove_temporaries,
    save_checkpoint,
)
from wn_rl.dormant import dormant_units
from wn_rl.provenance import provenance


class _Key(enum.IntEnum):
    A = 1


class _Text(str):
    pass


class _Dict(dict):
    pass


_Pair = collections.namedtuple("_Pair", "a b")


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (_Pair(1, 2), "_Pair"),
        (collections.defaultdict(list, a=[1]), "defaultdict"),
        (_Dict(a=1), "_Dict"),
        ({_Key.A: 1}, "_Key"),
        ({_Text("a"): 1}, "_Text"),
    ],
)
def test_subclasses_that_weights_only_refuses_are_refused_at_save(tmp_path, value, named):
    with pytest.raises(TypeError, match=rf"payload\['v'\].*{named}"):
        save_checkpoint(tmp_path / "checkpoint_1.pt", {"v": value})
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_the_subclasses_weights_only_loads_are_saved_and_load(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 2)).sum().backward()
    optimizer.step()
    payload = {
        "model": model.state_dict(),  # an OrderedDict
        "optimizer": optimizer.state_dict(),  # int keys
        "shape": torch.Size([2, 3]),
        "counts": collections.Counter(a=2),
        "flags": {True: 1, 0: "zero"},
        "parameter": nn.Parameter(torch.ones(2)),
        "nested": OrderedDict(a=[(1, 2.0, None, "x")]),
    }
    loaded = load_checkpoint(save_checkpoint(tmp_path / "checkpoint_1.pt", payload))
    assert type(loaded["model"]) is OrderedDict and loaded["shape"] == torch.Size([2, 3])
    torch.testing.assert_close(loaded["model"]["0.weight"], model[0].weight.detach())
    assert loaded["optimizer"]["state"][0]["step"] == 1 and loaded["counts"] == {"a": 2}


def _save(directory, *names):
    for name in names:
        save_checkpoint(directory / name, {"name": name})


def test_a_prefix_does_not_take_the_checkpoints_of_a_longer_one(tmp_path):
    _save(tmp_path, "run__1.pt", "run__10_7.pt")  # run__10.pt would be run__1 step 0: end a prefix in a non-digit
    assert [p.name for p in complete_checkpoints(tmp_path, "run__1")] == ["run__1.pt"]
    assert prune_checkpoints(tmp_path, 1, "run__1") == []  # run__1's only checkpoint stays
    assert (tmp_path / "run__1.pt").is_file() and (tmp_path / "run__10_7.pt").is_file()
    _save(tmp_path, "checkpoint_5.pt", "checkpoint_12.pt")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint_5.pt", "checkpoint_12.pt"]
    (tmp_path / "checkpoint_13.pt").write_bytes(b"x")  # no marker
    (tmp_path / "checkpoint_13.pt.bak.pt").write_bytes(b"x")  # not a checkpoint name
    assert [p.name for p in remove_incomplete(tmp_path)] == ["checkpoint_13.pt"]
    assert (tmp_path / "checkpoint_13.pt.bak.pt").is_file()


def test_temporaries_of_a_prefix_leave_a_longer_ones(tmp_path):
    names = [
        ".run__1_5.pt.tmp-1",
        ".run__15.pt.tmp-1",
        ".run__15.pt.complete.json.tmp-2",
        ".run__10_9.pt.tmp-3",
        ".run__1.pt.tmp-4",
        ".config.yaml.tmp-5",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = {p.name for p in remove_temporaries(tmp_path, "run__1")}
    assert removed == {".run__15.pt.tmp-1", ".run__15.pt.complete.json.tmp-2", ".run__1.pt.tmp-4"}
    (tmp_path / ".run__1.pt.complete.json.tmp-6").write_bytes(b"x")
    assert {p.name for p in remove_temporaries(tmp_path, "run__1.pt")} == {".run__1.pt.complete.json.tmp-6"}
    assert {p.name for p in remove_temporaries(tmp_path)} == {
        ".run__1_5.pt.tmp-1",
        ".run__10_9.pt.tmp-3",
        ".config.yaml.tmp-5",
    }


def test_directories_named_like_checkpoints_are_left_alone(tmp_path):
    _save(tmp_path, "checkpoint_1.pt", "checkpoint_2.pt")
    (tmp_path / "checkpoint_backup.pt").mkdir()
    (tmp_path / "checkpoint_3.pt").mkdir()
    (tmp_path / "checkpoint_3.pt.complete.json").mkdir()
    (tmp_path / ".checkpoint_4.pt.tmp-1").mkdir()
    assert remove_incomplete(tmp_path) == []
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint_1.pt", "checkpoint_2.pt"]
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["checkpoint_1.pt"]
    assert (tmp_path / "checkpoint_3.pt").is_dir() and (tmp_path / "checkpoint_backup.pt").is_dir()


def test_finite_activations_near_float32s_largest_value_are_not_dormant(one_torch_thread):
    x = torch.full((3, 4), 3e38)
    x[:, 3] = 0.0
    stats = dormant_units(nn.Sequential(nn.ReLU()), x)["0"]
    assert stats.scores.dtype == torch.float32 and stats.non_finite == 0
    torch.testing.assert_close(stats.scores, torch.tensor([4 / 3, 4 / 3, 4 / 3, 0.0]))
    assert (stats.dormant, stats.fraction) == (1, 0.25)
    linear = nn.Linear(2, 4)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(1e38)
    stats = dormant_units(nn.Sequential(linear, nn.ReLU()), torch.zeros(2, 2))["1"]
    assert torch.equal(stats.scores, torch.ones(4)) and stats.fraction == 0.0


def test_provenance_in_a_deleted_working_directory_is_none(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)  # changed back after the test
    gone.rmdir()
    info = provenance()
    json.dumps(info)
    assert info["cwd"] is None and info["command"]
