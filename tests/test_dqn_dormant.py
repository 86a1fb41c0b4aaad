"""Dormant units in native DQN: a real MinAtar run writes ``dormant/*`` to TensorBoard, measuring changes neither
the network nor the random stream, and scripts/dormant_units.py reports a saved run (a collapsed one: every
fc unit dead, Q std 0, one action everywhere) on the states of a random policy or of the agent itself."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.dqn.config import NetworkConfig, config_dict, load_dqn_config, load_run_config, with_older_defaults
from agents.dqn.dormant import _q_summary, newest_weights, policy_states, run_dormant_report
from agents.dqn.envs import EnvSpec, make_env
from agents.dqn.logs import log_dormant
from agents.dqn.networks import build_q_network
from agents.dqn.replay import ReplayMemory
from agents.dqn.run_dir import check_resume_config
from agents.dqn.runner import SAFE_TO_CHANGE, Trainer
from wn_rl.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from wn_rl.config import ConfigError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dormant_units.py"


class _Writer:
    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag] = value


def _script():
    spec = importlib.util.spec_from_file_location("wn_rl_script_dormant_units", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script_main():
    return _script().main


def test_log_dormant_changes_no_state_or_random_stream_and_waits_for_two_states():
    spec = EnvSpec("minatar", "breakout", 2, (4, 10, 10), 1, np.dtype(np.uint8), 3, {})
    q_network = build_q_network(NetworkConfig(parameterization="weight_norm+mean_only_bn"), spec)
    replay = ReplayMemory(100, 2, spec.frame_shape, spec.frame_dtype, 1, 1, "cpu")
    writer = _Writer()
    log_dormant(writer, q_network, replay, 0)
    assert writer.scalars == {}  # an empty memory: nothing to measure yet
    flags = {name: torch.zeros(2, dtype=torch.bool) for name in ("terminated", "truncated", "life_loss")}
    for _ in range(12):
        obs = torch.randint(0, 2, (2, 4, 10, 10), dtype=torch.uint8)
        replay.add(
            obs,
            torch.zeros(2, dtype=torch.bool),
            torch.zeros(2, dtype=torch.bool),
            torch.zeros(2),
            torch.zeros(2),
            **flags,
        )
    before = {k: v.clone() for k, v in q_network.state_dict().items()}
    rng = torch.get_rng_state()
    log_dormant(writer, q_network, replay, 100)
    assert set(writer.scalars) == {"dormant/body.1/fraction", "dormant/body.4/fraction", "dormant/total_fraction"}
    assert all(0.0 <= v <= 1.0 for v in writer.scalars.values())
    assert torch.equal(torch.get_rng_state(), rng) and q_network.training
    assert all(torch.equal(v, q_network.state_dict()[k]) for k, v in before.items())  # running means untouched


def _tiny_config(runs, parameterization="normal", total=600, stats_every=200, extra=()):
    overrides = [
        *extra,
        f"run.total_agent_steps={total}",
        "agent.replay_capacity_transitions=2000",
        "agent.learning_starts_agent_steps=200",
        "network.ddi_batch_size=64",
        f"network.parameterization={parameterization}",
        "eval.every_agent_steps=0",
        "run.log_every_agent_steps=200",
        f"run.wn_stats_every_agent_steps={stats_every}",
        "run.checkpoint_every_agent_steps=300",
        "run.torch_threads=1",
        f"run.runs_dir={runs}",
        "run.progress_bar=false",
    ]
    return load_dqn_config("configs/dqn/minatar_breakout.yaml", overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    Trainer(_tiny_config(runs), runs / "normal").run()
    return runs / "normal"


def test_measuring_dormant_units_leaves_the_run_bit_identical(tmp_path):
    weights = []
    for stats_every in (100, 10_000):  # measured at every 100 agent steps, or never
        trainer = Trainer(
            _tiny_config(tmp_path, "weight_norm+mean_only_bn", 400, stats_every), tmp_path / str(stats_every)
        )
        trainer.run()
        weights.append(trainer.learner.q_network.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_minatar_run_logs_dormant_fractions_with_the_wn_statistics(tiny_run):
    acc = EventAccumulator(str(tiny_run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("dormant/body.1/fraction", "dormant/body.4/fraction", "dormant/total_fraction"):
        assert tag in tags, tag
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [200, 400, 600]
        assert all(0.0 <= e.value <= 1.0 for e in events)


def test_the_script_prints_a_table_and_writes_json(tiny_run, tmp_path):
    out = tmp_path / "dormant.json"
    args = [str(tiny_run), "--envs", "2", "--steps", "30", "--device", "cpu", "--policy", "agent", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "| run | agent step | policy | body.1 | body.4 | dormant total | Q std | greedy action share |"
    assert lines[2].startswith("| normal | 600 | agent eps 0.05 | ") and "/16 | " in lines[2] and "/128 | " in lines[2]
    (report,) = json.loads(out.read_text())
    assert report["agent_step"] == 600 and report["states"] == 60
    assert report["policy"] == "agent" and report["epsilon"] == 0.05  # the run's eval.epsilon
    assert report["layers"]["body.4"]["units"] == 128 and report["q_std"] > 0


def _edited_run(tiny_run, run_dir, name, value):
    """A copy of ``tiny_run`` whose newest checkpoint has the Q-network's parameter ``name`` set to ``value``."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    state = load_checkpoint(complete_checkpoints(tiny_run / "checkpoints")[-1])
    state["learner"]["q_network"][name].copy_(torch.as_tensor(value))
    save_checkpoint(run_dir / "checkpoints" / "checkpoint_000000000600.pt", state)
    return run_dir


def test_a_collapsed_network_is_reported_all_dormant_with_one_action(tiny_run, tmp_path):
    collapsed = _edited_run(tiny_run, tmp_path / "collapsed", "body.3.bias", -1e4)  # the fc ReLUs never open
    report = run_dormant_report(collapsed, num_envs=2, steps=20)
    assert report["policy"] == "random" and report["epsilon"] == 1.0
    assert report["layers"]["body.4"] == {"dormant": 128, "units": 128, "fraction": 1.0}
    assert report["q_std"] == 0.0 and report["greedy_action_share"] == 1.0
    acting = run_dormant_report(collapsed, num_envs=2, steps=20, policy="agent")  # epsilon actions still vary
    assert acting["states"] == 40 and acting["policy"] == "agent" and acting["greedy_action_share"] == 1.0
    assert _q_summary(torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 5.0]])) == pytest.approx(
        {"q_std": (2 / 3**0.5 + 4 / 3**0.5) / 2, "greedy_action_share": 2 / 3}  # sample stds over states
    )


def test_the_script_refuses_a_directory_that_is_no_run_or_has_no_checkpoint(tiny_run, tmp_path, capsys):
    main = _script_main()
    assert main([str(tmp_path)]) == 2
    assert "holds no config.yaml" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    assert main([str(tmp_path), "--device", "cpu"]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tiny_run), "--tau", "-1"])
    assert "--tau -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tiny_run), "--policy", "greedy"])
    assert "argument --policy: invalid choice: 'greedy' (choose from" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"policy='greedy': expected one of \('random', 'agent'\)"):
        run_dormant_report(tiny_run, policy="greedy")


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_newest_weights_maps_the_checkpoint_on_the_cpu_and_moves_only_the_q_network(tiny_run, torch_loads, device):
    """The checkpoint was loaded with map_location=device: the replay memory of a run.save_replay=true run (~7 GB
    for Atari) went to the GPU with it. It is mapped on the CPU now, and only the Q-network reaches the device."""
    agent_step, weights = newest_weights(tiny_run, torch.device(device))
    ((kwargs, payload),) = torch_loads
    assert kwargs.get("mmap") is True and torch.device(kwargs.get("map_location")) == torch.device("cpu")
    assert payload["learner"]["q_network"]["head.bias"].device.type == "cpu"
    assert agent_step == 600 and weights.keys() == payload["learner"]["q_network"].keys()
    assert all(w.device.type == device for w in weights.values())


def test_the_script_checks_the_json_folder_before_any_work_and_reports_a_failed_write(tiny_run, tmp_path, capsys):
    """A --json path in a missing folder ended, after every run was measured, in a traceback with exit code 1."""
    script = _script()
    real_report = script.run_dormant_report
    quick = [str(tiny_run), "--envs", "2", "--steps", "5", "--device", "cpu", "--json"]

    def no_work(*args, **kwargs):
        raise AssertionError("a run was measured before the --json path was checked")

    script.run_dormant_report = no_work
    missing = tmp_path / "no_such_folder" / "dormant.json"
    for path, message in (
        (missing, f"--json {missing}: its folder {missing.parent} does not exist; create it first"),
        (tmp_path, f"--json {tmp_path} is a folder; give a file name, e.g. {tmp_path / 'dormant.json'}"),
    ):
        with pytest.raises(SystemExit) as stopped:
            script.main([*quick, str(path)])
        assert stopped.value.code == 2 and message in capsys.readouterr().err

    out = tmp_path / "gone" / "dormant.json"
    out.parent.mkdir()

    def report_then_the_folder_goes(*args, **kwargs):  # the folder is removed while the runs are measured
        report = real_report(*args, **kwargs)
        out.parent.rmdir()
        return report

    script.run_dormant_report = report_then_the_folder_goes
    assert script.main([*quick, str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("| run | agent step | policy |")  # the numbers were printed first
    assert f"error: could not write {out}: No such file or directory" in captured.err
    assert "the table above holds the same numbers" in captured.err and "Traceback" not in captured.err


def test_the_agent_policy_collects_its_own_states_the_same_for_a_seed(tiny_run, tmp_path):
    """A network that prefers action 0 (its head's bias) walks elsewhere than a random policy, the same way for a
    seed; at epsilon 1 it is the random policy, draw for draw."""
    bias = torch.tensor([1e3, 0.0, 0.0])
    one_action = _edited_run(tiny_run, tmp_path / "one_action", "head.bias", bias)
    reports = [run_dormant_report(one_action, num_envs=2, steps=40, seed=3, policy=p) for p in ("agent", "agent")]
    assert reports[0] == reports[1] and reports[0]["policy"] == "agent" and reports[0]["epsilon"] == 0.05
    assert run_dormant_report(one_action, num_envs=2, steps=40, seed=3)["q_std"] != reports[0]["q_std"]
    config = load_run_config(one_action)
    q_network = build_q_network(config.network, EnvSpec("minatar", "breakout", 2, (4, 10, 10), 1, np.uint8, 3, {}))
    q_network.load_state_dict(newest_weights(one_action, torch.device("cpu"))[1])

    def states(*policy):  # a fresh env each time: MinAtar keeps its sticky last action through a reset
        env = make_env(config.env, num_envs=2)
        try:
            return policy_states(env, 40, 3, *policy)
        finally:
            env.close()

    random, agent, again = states(), states(q_network, 0.05), states(q_network, 0.05)
    assert np.array_equal(agent, again) and not np.array_equal(agent, random)
    assert np.array_equal(states(q_network, 1.0), random) and q_network.training


@pytest.mark.parametrize("tau", ["-0.1", ".nan", ".inf"])
def test_a_bad_dormant_tau_fails_naming_the_key(tau):
    with pytest.raises(ConfigError, match=r"run\.dormant_tau=.* is invalid: expected a finite threshold >= 0"):
        load_dqn_config("configs/dqn/smoke.yaml", [f"run.dormant_tau={tau}"])


def test_run_dormant_tau_reaches_the_logged_fractions(tmp_path):
    """A tau above every score counts every unit dormant: total_fraction 1 (tau 0 gave less in the same run)."""
    Trainer(_tiny_config(tmp_path, total=300, stats_every=100, extra=["run.dormant_tau=1e9"]), tmp_path / "r").run()
    acc = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("dormant/total_fraction")
    assert [e.step for e in events] == [100, 200, 300] and all(e.value == 1.0 for e in events)


def test_a_run_from_before_dormant_tau_resumes_with_tau_0_or_a_new_tau(tmp_path):
    """``run.dormant_tau`` only changes what is logged: absent from an older run's config.yaml it reads 0.0 (what
    the run logged), and a resume may change it."""
    config = _tiny_config(tmp_path)
    saved = config_dict(config)
    del saved["run"]["dormant_tau"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert with_older_defaults(saved)["run"]["dormant_tau"] == 0.0
    assert load_run_config(tmp_path).run.dormant_tau == 0.0
    assert "run.dormant_tau" in SAFE_TO_CHANGE
    check_resume_config(tmp_path, config, force=False)
    check_resume_config(tmp_path, _tiny_config(tmp_path, extra=["run.dormant_tau=0.1"]), force=False)
