"""The throughput benchmark's interleaving: a contender that fails is dropped and reported, the others
are still timed (one broken configuration must not cost a whole run on a borrowed GPU)."""

from agents.dqn.benchmark import Contender, throughput


def _contender(name, log, fail_on_call=None):
    state = {"steps": 0, "calls": 0, "closed": False}

    def advance(n):
        state["calls"] += 1
        log.append(name)
        if state["calls"] == fail_on_call:
            raise RuntimeError(f"{name} broke")
        state["steps"] += n

    def close():
        state["closed"] = True

    return Contender(name, advance, lambda: state["steps"], close), state


def test_a_failing_contender_is_dropped_and_reported_and_the_others_are_timed(capsys):
    log = []
    ok, ok_state = _contender("ok", log)
    bad, bad_state = _contender("bad", log, fail_on_call=2)  # fails in its first timed chunk
    late, late_state = _contender("late", log, fail_on_call=1)  # fails in the warm-up
    failures = {}
    sps = throughput([ok, bad, late], warmup=5, steps=10, rounds=3, failures=failures)
    assert set(sps) == {"ok"} and sps["ok"] > 0
    assert ok_state["steps"] == 5 + 3 * 10
    assert failures == {"bad": "RuntimeError: bad broke", "late": "RuntimeError: late broke"}
    assert bad_state["closed"] and late_state["closed"] and not ok_state["closed"]
    # interleaved: warm-ups first, then rounds; the failed ones get no further calls
    assert log == ["ok", "bad", "late", "ok", "bad", "ok", "ok"]
    assert "RuntimeError: bad broke" in capsys.readouterr().err


def test_without_failures_every_contender_gets_a_rate():
    log = []
    contenders = [_contender(name, log)[0] for name in ("a", "b")]
    sps = throughput(contenders, warmup=1, steps=4, rounds=2)
    assert set(sps) == {"a", "b"} and all(v > 0 for v in sps.values())
    assert log == ["a", "b", "a", "b", "a", "b"]


def test_the_returns_benchmark_refuses_a_budget_without_updates_at_once():
    """--steps at or below the 5,000 steps before learning starts failed with a traceback, and only after the SB3
    side had trained every step."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_dqn_returns.py"
    ran = subprocess.run(
        [sys.executable, str(script), "--steps", "5000"], capture_output=True, text=True, timeout=120, check=False
    )
    assert ran.returncode == 2
    assert "--steps 5000: expected more than the 5,000 agent steps before learning starts" in ran.stderr
