"""The strict YAML config layer shared by every script."""

from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

from wn_rl.config import (
    ConfigError,
    check,
    config_diff,
    config_to_dict,
    dump_yaml,
    load_config,
    load_yaml,
    parse_overrides,
    read_yaml,
    resolve_device,
)


@dataclass(frozen=True)
class Env:
    game: str = "breakout"
    num_envs: int = 8


@dataclass(frozen=True)
class Train:
    lr: float = 3e-4
    env: Env = field(default_factory=Env)
    parameterization: Literal["normal", "weight_norm"] = "weight_norm"
    hidden: tuple[int, ...] = (64, 64)
    seed: int | None = None

    def __post_init__(self):
        check(self.lr > 0, "lr", self.lr, "a positive learning rate")


def test_yaml_and_overrides_build_a_frozen_typed_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nenv:\n  game: pong\nhidden: [32, 16]\n")
    config = load_config(Train, path, ["env.num_envs=4", "seed=3"])
    assert config == Train(lr=1e-3, env=Env("pong", 4), hidden=(32, 16), seed=3)
    with pytest.raises(AttributeError):
        config.lr = 1.0
    assert config_to_dict(config)["hidden"] == [32, 16]
    assert config_diff(config_to_dict(config), config_to_dict(Train())) == {
        "env.game": ("pong", "breakout"), "env.num_envs": (4, 8), "hidden": ([32, 16], [64, 64]),
        "lr": (1e-3, 3e-4), "seed": (3, None),
    }  # fmt: skip


@pytest.mark.parametrize(
    "text,message",
    [
        ("lrr: 1.0\n", "unknown key 'lrr'; did you mean 'lr'"),
        ("env: {num_env: 2}\n", "env: unknown key 'num_env'"),
        ("zzz: 1\n", "unknown key 'zzz'. Valid keys: ['env', 'hidden', 'lr', 'parameterization', 'seed']"),
        ("lr: fast\n", "lr: expected a number, got 'fast'"),
        ("env: {num_envs: 2.5}\n", "env.num_envs: expected an integer"),
        ("parameterization: wn\n", "'wn' is not one of"),
        ("lr: -1\n", "lr=-1.0 is invalid: expected a positive learning rate"),
        ("- a\n- b\n", "expected a mapping"),
        ("lr: [\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_file_key_and_value(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.yaml") as info:
        load_config(Train, path)
    assert message in str(info.value)


def test_override_syntax_errors_and_missing_files(tmp_path):
    assert parse_overrides(["a.b=[1, 2]", "c=true"]) == {"a": {"b": [1, 2]}, "c": True}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Train, tmp_path / "missing.yaml")


def test_exponent_floats_without_a_dot_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML alone (YAML 1.1) reads 1e-3 as a string; untyped values (SB3 hyperparameters) would keep it."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nscale: 3E5\nname: 1e\nsteps: 10\n")
    data = read_yaml(path)
    assert data == {"lr": 0.001, "scale": 300000.0, "name": "1e", "steps": 10}
    assert isinstance(data["steps"], int)
    assert parse_overrides(["hyperparameters.learning_rate=1e-3", "grid=[1e-4, -3e-4]"]) == {
        "hyperparameters": {"learning_rate": 0.001},
        "grid": [0.0001, -0.0003],
    }


@dataclass(frozen=True)
class Image:
    size: tuple[int, int] = (28, 28)
    crop: tuple[int, str] = (4, "center")


def test_fixed_length_tuples_check_the_length_and_each_position(tmp_path):
    assert load_config(Image, overrides=["size=[32, 32]", "crop=[2, edge]"]) == Image((32, 32), (2, "edge"))
    with pytest.raises(ConfigError, match=r"size: expected a list of 2 values, got \[32, 32, 3\]"):
        load_config(Image, overrides=["size=[32, 32, 3]"])
    with pytest.raises(ConfigError, match=r"crop\[1\]: expected a string, got 7"):
        load_config(Image, overrides=["crop=[2, 7]"])


@dataclass(frozen=True)
class Switches:
    name: str = "run"
    mode: Literal["auto", "eager"] = "auto"
    double_dqn: bool = False
    steps: int = 10
    tag: str | None = None


def test_yaml_1_1_quirks_are_refused_or_read_as_meant(tmp_path):
    """PyYAML follows YAML 1.1: 010 is octal 8, 1:30 is base 60 (90), yes/no/on/off are booleans."""
    path = tmp_path / "c.yaml"
    path.write_text("name: run\nsteps: 010\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line 2: 010 .*octal \(8\); write 10 without the leading zero"):
        load_config(Switches, path)
    for value in ("010", "-010", "0_7", "1:30"):
        with pytest.raises(ConfigError, match=rf"override 'steps={value}': {value} .*YAML 1\.1"):
            load_config(Switches, overrides=[f"steps={value}"])
    with pytest.raises(ConfigError, match=r"quote it \('007'\)"):
        load_config(Switches, overrides=["name=007"])
    assert load_config(Switches, overrides=["name='007'", "steps=0"]) == Switches(name="007", steps=0)
    assert load_config(Switches, overrides=["steps=0x10"]).steps == 16  # explicit hex stays
    # an exponent float for an int field is taken when it is an exact integer
    assert load_config(Switches, overrides=["steps=1e5"]).steps == 100_000
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 0\.001"):
        load_config(Switches, overrides=["steps=1e-3"])
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got '09'.*without the leading zero"):
        load_config(Switches, overrides=["steps=09"])
    # yes/no/on/off: the boolean for a bool field; where a string is expected, an error saying to quote it
    assert load_config(Switches, overrides=["double_dqn=yes"]).double_dqn is True
    assert load_config(Switches, overrides=["double_dqn=off"]).double_dqn is False
    for override, message in [
        ("name=on", "name: expected a string, got True"),
        ("mode=no", "mode: False is not one of"),
        ("tag=off", "tag: False matches none of"),
    ]:
        with pytest.raises(ConfigError, match=rf"{message}.*yes/no/on/off.*quote it"):
            load_config(Switches, overrides=[override])


def test_base_60_floats_are_refused_as_base_60_integers_are(tmp_path):
    """YAML 1.1 reads 1:30.5 as 90.5 and 0:30.0 as 30.0."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1:30.5\n")
    message = r"c\.yaml, line 1: 1:30\.5 is read by YAML 1\.1 as a base-60 number \(90\.5\); write the number"
    with pytest.raises(ConfigError, match=message):
        read_yaml(path)
    with pytest.raises(ConfigError, match=r"override 'lr=0:30\.0': 0:30\.0 .*base-60.*quote it \('0:30\.0'\)"):
        load_config(Train, overrides=["lr=0:30.0"])
    assert load_config(Switches, overrides=["name='1:30.5'"]).name == "1:30.5"


def test_a_key_given_twice_in_a_mapping_is_refused_with_both_lines(tmp_path):
    """PyYAML keeps the last of a repeated key: a second env: section would drop the first one's settings."""
    path = tmp_path / "c.yaml"
    path.write_text("env: {game: pong, num_envs: 4}\nseed: 3\nenv: {game: qbert}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line 3: key 'env' is given twice .*at line 1 and line 3"):
        load_config(Train, path)
    path.write_text("env:\n  game: pong\n  num_envs: 4\n  game: qbert\n")
    with pytest.raises(ConfigError, match=r"key 'game' is given twice .*at line 2 and line 4.*merge the two"):
        load_config(Train, path)
    with pytest.raises(ConfigError, match=r"override 'env=\{game: a, game: b\}': key 'game' is given twice"):
        load_config(Train, overrides=["env={game: a, game: b}"])
    # a key merged in with << may be overridden, as YAML intends
    assert load_yaml("base: &b {x: 1, y: 2}\nnew:\n  <<: *b\n  x: 3\n")["new"] == {"x": 3, "y": 2}


def test_a_mapping_override_merges_with_earlier_dotted_overrides_in_either_order():
    expected = Train(lr=5e-4, env=Env("pong", 4))
    assert load_config(Train, overrides=["lr=5e-4", "env.num_envs=4", "env={game: pong}"]) == expected
    assert load_config(Train, overrides=["env={game: pong}", "env.num_envs=4", "lr=5e-4"]) == expected
    assert parse_overrides(["a.b.c=1", "a={b: {d: 2}, e: 3}"]) == {"a": {"b": {"c": 1, "d": 2}, "e": 3}}
    assert parse_overrides(["a.b=1", "a={b: 2}"]) == {"a": {"b": 2}}  # the later override of a key wins
    assert parse_overrides(["a={b: 2}", "a.b=1"]) == {"a": {"b": 1}}


def test_unreadable_config_files_are_config_errors_naming_the_file(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=rf"config file '{tmp_path}' is a directory; expected a YAML file"):
        read_yaml(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_bytes("env: {game: pong}\nname: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c\.yaml' is not UTF-8 text \(byte 0xe9 at offset 27\)"):
        load_config(Train, path)
    path.write_text("name: caf\u00e9\n", encoding="utf-8")
    assert read_yaml(path) == {"name": "caf\u00e9"}

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_text", denied)  # chmod does not stop root
    with pytest.raises(ConfigError, match=r"c\.yaml' cannot be read: Permission denied"):
        read_yaml(path)


def test_dumped_configs_quote_the_strings_the_loader_would_read_as_numbers(tmp_path):
    """yaml.safe_dump (YAML 1.1) writes the string '1e5' bare; this loader reads 1e5 as a float."""
    data = {
        "run": {"name": "1e5", "lr": 1e-5, "steps": 10, "on": True, "tag": None},
        "names": ["1E-3", "+1e+5", "-2e-4", ".5", "010", "1:30", "1:30.5", "yes", "null", "~", "0x10", "run"],
        "1e5": "key",
    }
    text = dump_yaml(data)
    assert "name: '1e5'" in text and "'1e5': key" in text and "lr: 1.0e-05" in text
    assert load_yaml(text) == data
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert read_yaml(path) == data
    config = Switches(name="1e5", tag="1E-3")  # a run's own config.yaml loads again on resume
    path.write_text(dump_yaml(config_to_dict(config)))
    assert load_config(Switches, path) == config


def _fake_gpus(monkeypatch, count: int) -> None:
    """Pretend ``count`` CUDA devices exist; initialising CUDA would fail the test (the check must not touch it)."""

    def no_cuda_init() -> None:
        raise AssertionError("resolve_device initialised CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda_init)


def test_a_cuda_index_past_the_device_count_is_refused_with_the_valid_range(monkeypatch):
    _fake_gpus(monkeypatch, 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError) as info:
        resolve_device("cuda:1", "run.device")
    message = str(info.value)
    assert message.startswith("run.device='cuda:1' but this machine has 1 CUDA device(s)")
    assert "the valid ones are cuda:0;" in message and "use run.device=cuda:0 or auto" in message
    _fake_gpus(monkeypatch, 4)
    assert resolve_device("cuda:3") == torch.device("cuda:3")
    with pytest.raises(ConfigError, match=r"'cuda:5' but .* 4 CUDA device\(s\).* valid ones are cuda:0\.\.cuda:3"):
        resolve_device("cuda:5")


def test_a_missing_cuda_or_mps_backend_is_refused(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match=r"--device='cuda:0' but no CUDA device is available here; use --device=auto"):
        resolve_device("cuda:0", "--device")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("mps", "mps:0"):
        with pytest.raises(ConfigError, match=rf"device='{name}' but MPS \(Apple GPU\) is not available here"):
            resolve_device(name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("name", ["cuda:x", "gpu", "cuda:-1", "CUDA", "cuda:1:2", " cuda", "", "xpu", "meta", "0"])
def test_malformed_or_unsupported_device_names_are_config_errors(monkeypatch, name):
    _fake_gpus(monkeypatch, 8)
    with pytest.raises(ConfigError) as info:
        resolve_device(name, "run.device")
    assert str(info.value) == (
        f"run.device={name!r} is not a device: expected auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
    )
