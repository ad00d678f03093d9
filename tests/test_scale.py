"""The scale harness: `cpctl scale run smoke` end to end, and its scenario-file checks.

The smoke run boots a 3-member etcd, two cp-operator processes and 20 real agents in two
worker processes, and injects an etcd leader kill, a quorum loss and a pause of every
operator; it must take under three minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.scale.scenario import ScenarioError, load_scenario

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = REPO / "scale-tests" / "scenarios"


def cpctl(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(300)
def test_smoke_scenario_passes_under_three_minutes(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = cpctl("scale", "run", "smoke", "--json", "--out", str(tmp_path / "report"))
    took = time.monotonic() - started
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr}"
    record = json.loads(proc.stdout)
    assert took < 180, f"the smoke run took {took:.0f}s"
    assert record["summary"]["passed"] and "error" not in record
    faults = {f["kind"]: f for f in record["faults"]}
    assert faults["etcd-leader-kill"]["restarts"]["distribution"] == {"0": 20}
    assert faults["quorum-loss"]["restarts"]["distribution"] == {"1": 20}
    assert faults["quorum-loss"]["restarts"]["reasons"] == {"no-quorum": 20}
    assert faults["operators-paused"]["restarts"]["distribution"] == {"1": 20}
    assert faults["operators-paused"]["restarts"]["reasons"] == {"heartbeat-stale": 20}
    for fault in record["faults"]:
        assert fault["convergence"]["converged"] == 20, fault["convergence"]
        assert all(v["pass"] for v in fault["invariants"].values()), fault["invariants"]
        assert fault["store"]["endpoints"] >= 40  # 2 per agent, plus churn
    # the report: every figure in JSON, the summary, and progress lines on stderr
    assert json.loads((tmp_path / "report" / "result.json").read_text())["scenario"] == "smoke"
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| 2 | quorum-loss |" in summary and "FAIL" not in summary
    assert "fault 3/3 operators-paused" in proc.stderr


def test_every_shipped_scenario_loads() -> None:
    names = sorted(p.stem for p in SCENARIOS.glob("*.toml"))
    assert {"smoke", "sharded", "standard", "large"} <= set(names)
    for name in names:
        scenario = load_scenario(str(SCENARIOS / f"{name}.toml"))
        assert scenario.faults, name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\n[[faults]]\nkind = "meteor"\n', "unknown kind 'meteor'"),
        ('name = "x"\n[agents]\ncount = "many"\n', "agents.count: want int"),
        ('name = "x"\n[agents]\ncuont = 3\n', "unknown key 'cuont'"),
        ('name = "x"\n[[faults]]\nkind = "shard-paused"\ncluster = "b"\n', "etcd_clusters >= 2"),
        ("name = \n", "not valid TOML"),
        ("[cluster]\n", "'name' (a string) is required"),
    ],
)
def test_bad_scenario_files_get_one_line_and_exit_2(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=r".+"):
        load_scenario(str(path))
    proc = cpctl("scale", "run", str(path), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_a_missing_scenario_is_a_usage_error() -> None:
    proc = cpctl("scale", "run", "no-such-scenario", timeout=60)
    assert proc.returncode == 2 and "cannot read scenario" in proc.stderr, proc.stderr


@pytest.mark.timeout(200)
def test_sharded_scenario_isolates_the_paused_cluster(tmp_path: Path) -> None:
    proc = cpctl("scale", "run", "sharded", "--json", "--out", str(tmp_path / "report"))
    assert proc.returncode in (0, 1), f"exit {proc.returncode}\n{proc.stderr}"
    record = json.loads(proc.stdout)
    assert "error" not in record, record["error"]
    (fault,) = record["faults"]
    assert fault["kind"] == "shard-paused"
    assert fault["restarts"]["distribution"] == {"0": 20}  # no full restart anywhere
    assert fault["recoveries"]["main"] == {"0": 20}  # the healthy shard never recovered
    assert set(fault["recoveries"]["b"]) <= {"0", "1"}
    made = fault["notes"]["healthy_shard_creates"]
    assert made["ok"] >= 5 and made["failed"] == 0, made
    failed = [k for k, v in {**fault["invariants"], **fault["goals"]}.items() if not v["pass"]]
    assert failed == [] and proc.returncode == 0, failed
    assert fault["convergence"]["converged"] == 20
