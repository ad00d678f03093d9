"""Scenario files: what to boot, how much churn, which faults and what each must cost.

A scenario is a small TOML file (``scale-tests/scenarios/*.toml``)::

    name = "smoke"
    [cluster]                # etcd clusters, members, operators and their timings
    [agents]                 # how many, in how many worker processes, their timings
    [churn]                  # endpoint creates/deletes per second across all agents
    [[faults]]               # in order; kind, duration, hold, expected restarts

Any mistake (unknown key, wrong type, unknown fault kind) raises :class:`ScenarioError`
with one line naming the place; `cpctl scale run` prints it and exits 2.
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

FAULT_KINDS = (
    "etcd-member-kill",
    "etcd-leader-kill",
    "quorum-loss",
    "operators-paused",
    "operator-leader-kill",
    "worker-kill",
    "malformed-values",
    "shard-paused",
    "agent-partition",
    "etcd-latency",
    "compact-defrag",
    "apiserver-restart",
    "malformed-objects",
)
PARTITION_MODES = ("blackhole", "reset")
STORES = ("kvstore", "crd")
CRD_FAULTS = ("apiserver-restart", "malformed-objects")
"""The faults of CRD-mode scenarios only; operator-leader-kill and worker-kill are of both
modes, every other one of the kvstore's."""
SCENARIO_DIR = Path("scale-tests/scenarios")


class ScenarioError(Exception):
    """A scenario file that cannot be used (one line)."""


@dataclass(frozen=True)
class ClusterSpec:
    store: str = "kvstore"
    """"kvstore": agents and operators on etcd; "crd": on the local Kubernetes API server
    (a `cpctl kube up` process on the first etcd cluster)."""
    etcd_clusters: int = 1
    """Number of etcd clusters; with 2+, identities, endpoints and IPAM are sharded."""
    etcd_members: int = 3
    """Members of each etcd cluster."""
    etcd_heartbeat_ms: int = 50
    etcd_election_ms: int = 500
    """etcd's raft timings (fast failover on an idle machine; a loaded one wants more)."""
    operators: int = 2
    """cp-operator processes (HA replicas)."""
    heartbeat_interval: float = 3.0
    """The operators' heartbeat interval (agents call it stale after twice this)."""
    lease_duration: int = 2
    """Operator election lease TTL (s)."""
    renew_deadline: float = 1.5
    retry_period: float = 0.5
    pool_cidr: str = "10.0.0.0/8"
    """The operators' cluster pool; every endpoint IP lies in it."""
    proxy_groups: int = 0
    """Agents reach etcd through fault-injecting TCP proxies (controlplane/scale/proxy.py),
    one per member per group, agent i in group i % proxy_groups; 0: straight to etcd.
    Operators and the harness always talk to etcd directly."""


@dataclass(frozen=True)
class AgentSpec:
    count: int = 20
    workers: int = 2
    """Worker processes the agents are spread over (each runs count/workers agents)."""
    endpoints_per_agent: int = 2
    label_sets: int = 5
    """Distinct label sets (so identities are shared between agents)."""
    status_check_interval: float = 0.5
    quorum_check_timeout: float = 1.0
    max_consecutive_quorum_errors: int = 2
    restart_delay: float = 0.2
    restart_spread: float = 2.0
    lease_ttl: int = 120
    ready_timeout: float = 90.0
    """Seconds for every agent to become ready (and after a fault, healthy again)."""


@dataclass(frozen=True)
class ChurnSpec:
    rate: float = 4.0
    """Endpoint operations per second across all agents (creates and deletes alternate)."""
    identity_burst: int = 0
    """After populating, each worker creates (then deletes) this many endpoints with label
    sets never seen before, all at once: the report's identity allocations per second."""


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    duration: float = 6.0
    """How long the fault lasts (pause, outage) before it heals."""
    hold: float = 6.0
    """Seconds after healing during which restarts are still counted (a second restart
    after the outage, a restart loop)."""
    expect_restarts: int | None = None
    """Full control-plane restarts each agent must show for this fault; None: not checked."""
    expect_recoveries: dict[str, int] = field(default_factory=dict)
    """Per shard (cluster name): at most this many shard recoveries per agent."""
    expect_spread: bool = False
    """Agents that restarted must be ready again spread over at least half their
    ``restart_spread`` (the per-node delay; meaningful when etcd itself is up)."""
    member: int = 0
    """etcd-member-kill: which member; worker-kill: which worker."""
    cluster: str = ""
    """shard-paused: which etcd cluster (by name: main, b, c...)."""
    fraction: float = 1.0
    """agent-partition, etcd-latency: the share of the proxy groups (so of the agents)
    affected, at least one group."""
    mode: str = "blackhole"
    """agent-partition: "blackhole" (connections hang) or "reset" (connections reset)."""
    latency_ms: int = 0
    """etcd-latency: added to each direction, per chunk."""
    converge_timeout: float = 60.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    agents: AgentSpec = field(default_factory=AgentSpec)
    churn: ChurnSpec = field(default_factory=ChurnSpec)
    faults: tuple[FaultSpec, ...] = ()

    @property
    def cluster_names(self) -> list[str]:
        return cluster_names(self.cluster.etcd_clusters)


def cluster_names(count: int) -> list[str]:
    return ["main", *(chr(ord("b") + i) for i in range(count - 1))]


def _build(cls: type[Any], data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: want a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ScenarioError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    values: dict[str, Any] = {}
    defaults = cls.__dataclass_fields__
    for key, value in data.items():
        template = defaults[key].default
        expected: type | None = type(template) if template not in (None, MISSING) else None
        if key == "kind":
            expected = str
        if key == "expect_restarts":
            expected = int
        if key == "expect_recoveries":
            if not isinstance(value, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value.values()
            ):
                raise ScenarioError(f"{where}.{key}: want a table of shard = integer")
            values[key] = dict(value)
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is not None and (
            not isinstance(value, expected) or isinstance(value, bool) != (expected is bool)
        ):
            raise ScenarioError(
                f"{where}.{key}: want {expected.__name__}, got {type(value).__name__} {value!r}"
            )
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ScenarioError(f"{where}.{key}: must not be negative ({value})")
        values[key] = value
    return cls(**values)


def parse_scenario(data: dict[str, Any], source: str) -> Scenario:
    data = dict(data)
    for key in data:
        if key not in {"name", "description", "cluster", "agents", "churn", "faults"}:
            raise ScenarioError(f"{source}: unknown key {key!r}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{source}: 'name' (a string) is required")
    cluster = _build(ClusterSpec, data.get("cluster", {}), f"{source}: cluster")
    agents = _build(AgentSpec, data.get("agents", {}), f"{source}: agents")
    churn = _build(ChurnSpec, data.get("churn", {}), f"{source}: churn")
    raw_faults = data.get("faults", [])
    if not isinstance(raw_faults, list):
        raise ScenarioError(f"{source}: 'faults' must be an array of tables ([[faults]])")
    faults = []
    for i, raw in enumerate(raw_faults):
        where = f"{source}: faults[{i}]"
        if not isinstance(raw, dict) or raw.get("kind") not in FAULT_KINDS:
            kind = raw.get("kind") if isinstance(raw, dict) else raw
            raise ScenarioError(f"{where}: unknown kind {kind!r} (known: {', '.join(FAULT_KINDS)})")
        faults.append(_build(FaultSpec, raw, where))
    description = str(data.get("description", ""))
    scenario = Scenario(name, description, cluster, agents, churn, tuple(faults))
    _check(scenario, source)
    return scenario


def _check(s: Scenario, source: str) -> None:
    if s.cluster.etcd_clusters < 1 or s.cluster.etcd_members < 1:
        raise ScenarioError(f"{source}: cluster needs at least one etcd cluster and member")
    if s.cluster.operators < 1:
        raise ScenarioError(f"{source}: cluster.operators must be at least 1")
    if s.cluster.proxy_groups > s.agents.count:
        raise ScenarioError(f"{source}: cluster.proxy_groups must not exceed agents.count")
    if s.agents.count < 1 or not 1 <= s.agents.workers <= s.agents.count:
        raise ScenarioError(f"{source}: agents.workers must be between 1 and agents.count")
    if s.cluster.store not in STORES:
        raise ScenarioError(f"{source}: cluster.store {s.cluster.store!r} not in {STORES}")
    crd = s.cluster.store == "crd"
    if crd and (s.cluster.etcd_clusters != 1 or s.cluster.proxy_groups):
        raise ScenarioError(f"{source}: CRD mode has one etcd cluster and no proxy groups")
    names = s.cluster_names
    for i, fault in enumerate(s.faults):
        where = f"{source}: faults[{i}] ({fault.kind})"
        if crd != (fault.kind in CRD_FAULTS) and fault.kind not in (
            "operator-leader-kill",
            "worker-kill",
        ):
            mode = "CRD" if crd else "kvstore"
            raise ScenarioError(f"{where}: not a fault of a {mode}-mode scenario")
        if fault.kind in ("quorum-loss", "etcd-leader-kill", "etcd-member-kill") and (
            s.cluster.etcd_members < 3
        ):
            raise ScenarioError(f"{where}: needs cluster.etcd_members >= 3")
        if fault.kind == "etcd-member-kill" and fault.member >= s.cluster.etcd_members:
            raise ScenarioError(f"{where}: member {fault.member} does not exist")
        if fault.kind == "worker-kill" and fault.member >= s.agents.workers:
            raise ScenarioError(f"{where}: worker {fault.member} does not exist")
        if fault.kind == "shard-paused":
            if s.cluster.etcd_clusters < 2:
                raise ScenarioError(f"{where}: needs cluster.etcd_clusters >= 2")
            if fault.cluster not in names:
                raise ScenarioError(f"{where}: cluster {fault.cluster!r} not in {names}")
        if fault.kind in ("agent-partition", "etcd-latency") and s.cluster.proxy_groups < 1:
            raise ScenarioError(f"{where}: needs cluster.proxy_groups >= 1")
        if not 0 < fault.fraction <= 1:
            raise ScenarioError(f"{where}: fraction must be in (0, 1]")
        if fault.mode not in PARTITION_MODES:
            raise ScenarioError(f"{where}: mode {fault.mode!r} not in {PARTITION_MODES}")
        if fault.kind == "etcd-latency" and fault.latency_ms <= 0:
            raise ScenarioError(f"{where}: needs latency_ms > 0")
        if fault.kind == "operator-leader-kill" and s.cluster.operators < 2:
            raise ScenarioError(f"{where}: needs cluster.operators >= 2")
        for shard in fault.expect_recoveries:
            if shard not in names:
                raise ScenarioError(f"{where}: expect_recoveries names unknown shard {shard!r}")


def load_scenario(name_or_path: str) -> Scenario:
    """A scenario by file path, or by name from ``scale-tests/scenarios/``."""
    path = Path(name_or_path)
    if not path.exists() and not name_or_path.endswith(".toml"):
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {name_or_path!r}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    return parse_scenario(data, str(path))
