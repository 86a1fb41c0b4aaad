"""wn_rl.checkpoint: atomic writes, weights_only loading, detection of truncated and corrupted files,
fallback to the previous complete checkpoint, clear errors on unwritable paths and full disks."""

import errno
import io
import os

import numpy as np
import pytest
import torch

from wn_rl import checkpoint as ck
from wn_rl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint


def _payload(step):
    return {"weights": torch.arange(1000, dtype=torch.float32) * step, "step": step, "history": [{"a": 1.5}]}


def test_round_trip_is_loadable_with_weights_only(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint_000010.pt", _payload(10), metadata={"agent_step": 10})
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == ck.FORMAT_VERSION and raw["step"] == 10
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["weights"], _payload(10)["weights"])
    assert ck.read_marker(path)["metadata"] == {"agent_step": 10}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_non_plain_objects_are_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"payload\['opt'\] is a SGD"):
        save_checkpoint(tmp_path / "c.pt", {"opt": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1)})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker"])
def test_damaged_newest_checkpoint_is_detected_and_skipped(tmp_path, damage):
    old = save_checkpoint(tmp_path / "checkpoint_000010.pt", _payload(10))
    new = save_checkpoint(tmp_path / "checkpoint_000020.pt", _payload(20))
    data = new.read_bytes()
    if damage == "truncate":
        new.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        new.write_bytes(data[:300] + bytes([data[300] ^ 0xFF]) + data[301:])
    else:
        (tmp_path / (new.name + ck.MARKER_SUFFIX)).unlink()
    if damage != "no_marker":
        with pytest.raises(CheckpointError, match=r"truncated or corrupted|corrupted"):
            load_checkpoint(new)
    if damage == "no_marker":  # an unmarked file is invisible: no warning, just the previous checkpoint
        assert latest_checkpoint(tmp_path) == old
    else:
        with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
            assert latest_checkpoint(tmp_path) == old
    assert load_checkpoint(old)["step"] == 10


def test_kill_during_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    old = save_checkpoint(tmp_path / "checkpoint_000010.pt", _payload(10))

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the process is interrupted in the middle of writing

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "checkpoint_000020.pt", _payload(20))
    assert not (tmp_path / "checkpoint_000020.pt").exists()
    assert latest_checkpoint(tmp_path) == old


def test_full_disk_names_the_path_and_keeps_previous(tmp_path, monkeypatch):
    old = save_checkpoint(tmp_path / "checkpoint_000010.pt", _payload(10))
    real_fsync = os.fsync

    def enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", enospc)
    with pytest.raises(CheckpointError, match=r"checkpoint_000020\.pt: No space left on device"):
        save_checkpoint(tmp_path / "checkpoint_000020.pt", _payload(20))
    monkeypatch.setattr(ck.os, "fsync", real_fsync)
    assert latest_checkpoint(tmp_path) == old
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_full_disk_at_the_completion_marker_leaves_no_unmarked_payload(tmp_path, monkeypatch):
    # found on a real tmpfs (docs/full_disk.md): the payload (GBs with the replay memory) stayed on the full
    # disk without its marker until the next start removed it
    old = save_checkpoint(tmp_path / "checkpoint_000010.pt", _payload(10))
    real_write = ck.atomic_write_bytes

    def full_at_the_marker(path, data):
        if str(path).endswith(ck.MARKER_SUFFIX):
            raise CheckpointError(f"could not write {path}: No space left on device (errno 28)")
        real_write(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", full_at_the_marker)
    with pytest.raises(CheckpointError, match=r"checkpoint_000020\.pt\.complete\.json: No space left on device"):
        save_checkpoint(tmp_path / "checkpoint_000020.pt", _payload(20))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name, old.name + ck.MARKER_SUFFIX]
    assert latest_checkpoint(tmp_path) == old and load_checkpoint(old)["step"] == 10


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(tmp_path / "nope" / "c.pt", _payload(1))


def test_newer_format_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "FORMAT_VERSION", 99)
    path = save_checkpoint(tmp_path / "c.pt", _payload(1))
    monkeypatch.setattr(ck, "FORMAT_VERSION", 1)
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)


def test_prune_keeps_the_newest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path / f"checkpoint_{step:06d}.pt", _payload(step))
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["checkpoint_000030.pt", "checkpoint_000040.pt"]
    assert len(list(tmp_path.iterdir())) == 4  # two files + two markers


@pytest.mark.parametrize("keep", [1, 2])
def test_a_damaged_newer_checkpoint_never_costs_the_one_just_written(tmp_path, keep):
    """Checkpoint 3000 is damaged (bit rot, a copy cut short): the run resumed from 2000 and, stopped by a signal,
    saved 2600. Ranked by number, 3000 outranked 2600 and pruning deleted the only loadable checkpoints."""
    for step in (1000, 2000, 3000):
        save_checkpoint(tmp_path / f"checkpoint_{step:06d}.pt", _payload(step))
    damaged = tmp_path / "checkpoint_003000.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash tells
    damaged.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert latest_checkpoint(tmp_path).name == "checkpoint_002000.pt"  # what the resume loads
    written = save_checkpoint(tmp_path / "checkpoint_002600.pt", _payload(2600))
    with pytest.warns(UserWarning, match=r"deleting \['checkpoint_003000.pt'\]: numbered after checkpoint_002600"):
        removed = prune_checkpoints(tmp_path, keep=keep, written=written)
    kept = [p.name for p in ck.complete_checkpoints(tmp_path)]
    assert kept == ["checkpoint_002000.pt", "checkpoint_002600.pt"][-keep:]
    assert damaged in removed and not damaged.exists()
    assert latest_checkpoint(tmp_path) == written


def test_remove_incomplete_deletes_only_what_killed_writers_left(tmp_path):
    kept = save_checkpoint(tmp_path / "checkpoint_000010.pt", _payload(10))
    temporary = tmp_path / ".checkpoint_000020.pt.tmp-12345"  # a write killed before its rename
    temporary.write_bytes(b"PK\x03\x04 half a zip")
    unmarked = tmp_path / "checkpoint_000020.pt"  # killed after the rename, before the marker
    unmarked.write_bytes(b"complete but unmarked")
    other = tmp_path / "notes.txt"
    other.write_text("not ours")
    assert sorted(ck.remove_incomplete(tmp_path)) == sorted([temporary, unmarked])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kept.name, kept.name + ck.MARKER_SUFFIX, "notes.txt"])
    assert load_checkpoint(kept)["step"] == 10


def test_a_full_disk_inside_torch_save_is_a_checkpoint_error_naming_the_path(tmp_path, monkeypatch):
    # a real full disk fails torch.save's own writes, which torch reports as a RuntimeError of its zip writer
    old = save_checkpoint(tmp_path / "checkpoint_000010.pt", _payload(10))
    real_open = open

    class FullDisk(io.FileIO):  # the disk fills up after the first kilobyte of the file
        def write(self, data):
            if self.tell() + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(
        ck, "open", lambda p, mode="r": FullDisk(p, mode) if "w" in mode else real_open(p, mode), raising=False
    )
    with pytest.raises(CheckpointError, match=r"checkpoint_000020\.pt: No space left on device \(errno 28\)"):
        save_checkpoint(tmp_path / "checkpoint_000020.pt", _payload(20))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name, old.name + ck.MARKER_SUFFIX]


def test_numpy_scalars_are_refused_before_writing(tmp_path):
    # numpy.float64 is a float subclass; written as is, the checkpoint would never load with weights_only
    with pytest.raises(TypeError, match=r"payload\['history'\]\[0\]\['return'\] is a float64"):
        save_checkpoint(tmp_path / "c.pt", {"history": [{"return": np.float64(1.5)}]})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("version", [0, -1, True])
def test_format_versions_below_1_are_refused(tmp_path, version):
    path = tmp_path / "c.pt"
    torch.save({"format_version": version}, path)
    with pytest.raises(CheckpointError, match=r"format_version .* reads versions 1\.\.1"):
        load_checkpoint(path, verify=False)
