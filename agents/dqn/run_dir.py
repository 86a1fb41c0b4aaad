"""The run directory of a native DQN run (layout in :mod:`agents.dqn.runner`): where it is, the files
written when a run starts, and which config changes a resume accepts."""

from __future__ import annotations

import json
from pathlib import Path

from agents.dqn.config import DQNConfig, config_dict, with_older_defaults
from agents.dqn.envs import EnvSpec
from wn_rl.checkpoint import atomic_write_bytes
from wn_rl.config import ConfigError, config_diff, dump_yaml, read_run_config
from wn_rl.provenance import provenance

__all__ = ["SAFE_TO_CHANGE", "check_resume_config", "run_dir_for", "write_run_files"]

SAFE_TO_CHANGE = (
    "run.total_agent_steps",
    "run.log_every_agent_steps",
    "run.wn_stats_every_agent_steps",
    "run.dormant_tau",  # only what is logged
    "run.checkpoint_every_agent_steps",
    "run.keep_checkpoints",
    "run.progress_bar",
    "run.device",
    "run.torch_threads",
    "run.runs_dir",
    "agent.update_mode",  # the same math (tests/test_dqn_fused.py), only how it runs
    "run.overlap_updates",  # bit-identical either way (tests/test_dqn_overlap.py)
    "run.acting",  # the same math (tests/test_dqn_overlap.py), only where it runs
)


def run_dir_for(config: DQNConfig, config_name: str) -> Path:
    """``runs_dir/<config>__<suite>-<game>__<parameterization>__seed<seed>`` (or ``run.name``)."""
    r, e = config.run, config.env
    name = r.name or f"{config_name}__{e.suite}-{e.name}__{config.network.parameterization}__seed{r.seed}"
    return Path(r.runs_dir) / name.replace("/", "_")


def check_resume_config(run_dir: Path, config: DQNConfig, force: bool) -> None:
    """Refuse to resume the run in ``run_dir`` with a config that differs from its ``config.yaml`` in any
    key outside :data:`SAFE_TO_CHANGE`, unless ``force``. An empty or damaged ``config.yaml`` is a
    :class:`ConfigError` naming it (:func:`wn_rl.config.read_run_config`): the run cannot be compared."""
    if not (run_dir / "config.yaml").exists():
        return
    old = with_older_defaults(read_run_config(run_dir, "scripts/train_dqn.py"))
    diff = {k: v for k, v in config_diff(old, config_dict(config)).items() if k not in SAFE_TO_CHANGE}
    if diff and not force:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise ConfigError(
            f"{run_dir} holds a run with a different config:\n{lines}\n"
            "Resume with the saved config, start a new run (run.name=...), or pass --force to resume anyway."
        )


def write_run_files(run_dir: Path, config: DQNConfig, spec: EnvSpec, terminal_on_life_loss: bool) -> None:
    """``checkpoints/``, and atomically ``config.yaml`` (resolved), ``provenance.json`` and ``env.json`` (the
    resolved protocol)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", dump_yaml(config_dict(config)).encode())
    atomic_write_bytes(run_dir / "provenance.json", json.dumps(provenance(), indent=1).encode())
    env_info = {
        "suite": spec.suite,
        "name": spec.name,
        "n_actions": spec.n_actions,
        "obs_shape": list(spec.obs_shape),
        "terminal_on_life_loss": terminal_on_life_loss,
        **spec.settings,
    }
    atomic_write_bytes(run_dir / "env.json", json.dumps(env_info, indent=1).encode())
