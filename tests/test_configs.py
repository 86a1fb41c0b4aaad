"""Every YAML file under configs/ loads into its typed, frozen config (STYLE.md: one test loads every
shipped config). A new config folder must be given its loader here, or this test fails."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wn_rl.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _dqn(path: Path) -> Any:
    from agents.dqn.config import load_dqn_config

    return load_dqn_config(str(path))


def _sb3(path: Path) -> Any:
    from wn_rl.sb3.config import load_sb3_config

    return load_sb3_config(path)


def _study(path: Path) -> Any:
    from wn_rl.analysis.study import load_study_config

    return load_study_config(path)


def _paper(path: Path) -> Any:
    from wn_rl.models.cifar_experiment import CifarConfig
    from wn_rl.models.comparison import CompareConfig
    from wn_rl.models.generative_experiment import GenerativeConfig

    kinds = {"cifar10": CifarConfig, "compare_parameterizations": CompareConfig}
    return load_config(kinds.get(path.stem, GenerativeConfig), path)


LOADERS: dict[str, Callable[[Path], Any]] = {"dqn": _dqn, "sb3": _sb3, "studies": _study, "paper": _paper}
ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_every_config_folder_has_a_loader():
    folders = {p.relative_to(CONFIGS).parts[0] for p in ALL}
    assert folders <= set(LOADERS), f"no loader registered in tests/test_configs.py for {folders - set(LOADERS)}"
    assert len(ALL) >= 50


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_config_loads_frozen(path):
    config = LOADERS[path.relative_to(CONFIGS).parts[0]](path)
    field = next(iter(vars(config)))
    with pytest.raises(AttributeError):
        setattr(config, field, None)
