"""The agent's settings and its command-line flags."""

from __future__ import annotations

import argparse
import enum
import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from controlplane.config import ConfigError
from controlplane.datapath.flowevents import Aggregation
from controlplane.datapath.sock_lb import cgroup2_mount
from controlplane.datapath.sysctls import PROC_SYS
from controlplane.flags import (
    Parser,
    add_kvstore_flags,
    add_store_flags,
    non_negative_float,
    positive_float,
    positive_int,
)
from controlplane.flows.client import DEFAULT_OBSERVER_SOCKET
from controlplane.flows.server import DEFAULT_CAPACITY, FlowSettings
from controlplane.model import IPAddress, NodeName, parse_ip, parse_node_name

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
"""A fatal error (the local API socket cannot be bound, a bug)."""
EXIT_USAGE: Final = 2
"""A bad flag or configuration (one line on stderr)."""
EXIT_RESTART: Final = 75
"""``--restart-mode=exit``: the kvstore went unhealthy; a supervisor should start us again
(EX_TEMPFAIL from sysexits.h)."""

DEFAULT_SOCKET: Final = Path("/var/run/cp/agent.sock")
DEFAULT_TELEMETRY: Final = "127.0.0.1:9962"
_FLOW_DEFAULTS: Final = FlowSettings()
DEFAULT_BPF_PIN_DIR: Final = Path("/sys/fs/bpf/cp")
"""Where the tc program's maps are pinned (``loader.DEFAULT_PIN_DIR``); the agent's
``cp_ipcache`` pin lives there too, so the program reuses the map the agent fills."""


class DatapathMode(enum.Enum):
    AUTO = "auto"
    """Kernel maps when ``detect_datapath()`` says they are usable, else userspace."""
    KERNEL = "kernel"
    """The pinned kernel ipcache, or fail (exit 2) when unavailable."""
    USERSPACE = "userspace"
    """Dict-backed maps in the process (nothing outlives it)."""


class RestartMode(enum.Enum):
    INPROCESS = "inprocess"
    """Tear down sessions and watches and reconnect inside the process (the default)."""
    EXIT = "exit"
    """Exit with :data:`EXIT_RESTART` and let the supervisor restart the process."""


@dataclass(frozen=True, slots=True)
class AgentSettings:
    node: NodeName
    """This node's name (the key of its node record, endpoints and leases)."""
    node_ips: tuple[IPAddress, ...] = (parse_ip("127.0.0.1"),)
    """The node's IPs, primary first (the tunnel endpoint of its endpoints)."""
    cluster: str = "default"
    """The control plane's cluster name in keys."""
    pool: str = "default"
    """The CIDR pool the operator allocates this node's pod CIDR from."""
    lease_ttl: int = 900
    """TTL (s) of the agent's etcd leases; long, so a restart does not lose its keys."""
    heartbeat_interval: float = 15.0
    """Expected operator heartbeat interval (s); stale after twice this (the writer's own
    interval field overrides it once a beat is seen)."""
    status_check_interval: float = 5.0
    """Seconds between kvstore status checks (quorum read + heartbeat age per shard)."""
    quorum_check_timeout: float = 2.0
    """Deadline (s) of the quorum read of one status check."""
    max_consecutive_quorum_errors: int = 2
    """Failed checks in a row after which a shard is unhealthy (and a restart is due)."""
    restart_delay: float = 1.0
    """Base delay (s) before reconnecting after a restart."""
    restart_spread: float = 5.0
    """Up to this much more delay (s), fixed per node by a hash of its name."""
    restart_mode: RestartMode = RestartMode.INPROCESS
    """What an unhealthy kvstore triggers: an in-process restart or an exit."""
    api_socket: Path = DEFAULT_SOCKET
    """Unix socket of the local HTTP/JSON API."""
    telemetry_host: str = "127.0.0.1"
    """Address of /metrics, /healthz, /readyz."""
    telemetry_port: int | None = 9962
    """Port of the telemetry endpoint (0: ephemeral; None: disabled)."""
    cleanup_on_exit: bool = False
    """On shutdown, withdraw endpoints and node record and revoke leases (normally kept,
    so endpoints survive an agent restart); with kernel maps, also unpin the ipcache; with
    ``routes``, also remove the routes to other nodes."""
    datapath: DatapathMode = DatapathMode.USERSPACE
    """Which ipcache map to drive. The command line defaults to ``auto``; a programmatic
    (in-process) agent defaults to userspace so it never touches the machine-wide pins."""
    bpf_pin_dir: Path = DEFAULT_BPF_PIN_DIR
    """Directory (on a bpffs) of the pinned ``cp_ipcache`` in kernel mode."""
    routes: bool = False
    """Keep a route to every other node's pod CIDR via that node's first IP (of the
    CIDR's family) in the main table, from the node watch. The command line defaults to
    on; a programmatic (in-process) agent defaults to off so it never touches the host's
    routing table."""
    routes_netns: str | None = None
    """Program those routes inside this network namespace (a name under /run/netns or a
    path) instead of the agent's own: for hosts whose node network lives in a netns."""
    cni_netns: str | None = None
    """Run the CNI plugin (``POST /v1/cni``, for the node's ``cp-cni`` launcher) inside
    this network namespace instead of the agent's own: the node's network, as for
    ``routes_netns``."""
    cni_timeout: float = 60.0
    """Bound of one CNI plugin run (waiting for a slot included); then it is killed and
    the launcher gets CNI error 11 (try again later)."""
    cni_concurrency: int = 4
    """CNI plugin runs at a time (more wait for a slot)."""
    set_sysctls: bool = False
    """At start, set the sysctls the datapath needs (``net.ipv4.ip_forward=1``) when they
    differ; off: only check and warn. The DaemonSet turns it on."""
    sysctl_root: Path = PROC_SYS
    """Where the sysctls are read and written (a test's directory instead of /proc/sys)."""
    flows_enabled: bool = True
    """Run the flow server (issue 14): with kernel maps it configures the programs' flow
    events and reads them; else it serves an empty ring."""
    flows: FlowSettings = _FLOW_DEFAULTS
    """Ring size, aggregation, rate limit of the flow server."""
    flows_socket: Path | None = None
    """Unix socket of the Observer API (gRPC). The command line defaults to
    /var/run/cp/observer.sock; an in-process agent serves none unless given one."""
    flows_listen: str | None = None
    """HOST:PORT of the Observer API over TCP (for a relay); None: none."""
    flows_tls: tuple[Path, Path] | None = None
    """(certificate, key) files: serve ``flows_listen`` with TLS (None: plain)."""
    lb_cgroup: Path | None = None
    """The cgroup v2 directory whose processes get socket load balancing of services (the
    ``cgroup/connect4``, ``sendmsg4``, ``recvmsg4`` programs, kernel mode only); None: the
    service maps are kept, no program is attached. The command line defaults to the
    cgroup v2 root (every pod); a programmatic agent to None, so it never touches the
    machine's cgroups."""

    def restart_jitter(self) -> float:
        """The per-node restart delay: base + a fixed fraction of the spread."""
        digest = hashlib.sha256(self.node.encode()).digest()
        fraction = int.from_bytes(digest[:8], "big") / 2**64
        return self.restart_delay + self.restart_spread * fraction


def default_node_name() -> str:
    return socket.gethostname().split(".", 1)[0].lower()


def _node_name(text: str) -> NodeName:
    try:
        return parse_node_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _node_ips(text: str) -> tuple[IPAddress, ...]:
    try:
        ips = tuple(parse_ip(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not ips or len(set(ips)) != len(ips):
        raise argparse.ArgumentTypeError(f"want distinct comma-separated IPs, got {text!r}")
    return ips


def _address(text: str) -> tuple[str, int | None]:
    if text in ("", "none", "off"):
        return "", None
    if text == "0":
        return "127.0.0.1", 0
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"want HOST:PORT, 0 or none, got {text!r}")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}")
    return host.strip("[]"), number


def _optional_path(text: str) -> Path | None:
    return None if text in ("", "none", "off") else Path(text)


def non_negative_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"want a number >= 0, got {text!r}")
    return value


def _listen(text: str) -> str | None:
    host, port = _address(text)
    if port is None:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def add_agent_flags(parser: argparse.ArgumentParser) -> None:
    node = parser.add_argument_group("node")
    node.add_argument(
        "--node-name",
        type=_node_name,
        default=None,
        metavar="NAME",
        help="this node's name (default: the hostname)",
    )
    node.add_argument(
        "--node-ip",
        type=_node_ips,
        default=None,
        metavar="IPS",
        help="the node's IPs, comma-separated, primary first (default 127.0.0.1)",
    )
    node.add_argument(
        "--cluster-name", default="default", metavar="NAME", help="cluster name in keys"
    )
    node.add_argument("--pool", default="default", metavar="NAME", help="CIDR pool of the pod CIDR")
    health = parser.add_argument_group("kvstore health and restart")
    health.add_argument(
        "--lease-ttl", type=positive_int, default=900, metavar="S", help="etcd lease TTL"
    )
    health.add_argument(
        "--heartbeat-interval",
        type=positive_float,
        default=15.0,
        metavar="S",
        help="expected operator heartbeat interval; stale after 2x (default 15)",
    )
    health.add_argument(
        "--status-check-interval",
        type=positive_float,
        default=5.0,
        metavar="S",
        help="seconds between kvstore status checks (default 5)",
    )
    health.add_argument(
        "--quorum-check-timeout",
        type=positive_float,
        default=2.0,
        metavar="S",
        help="deadline of a status check's quorum read (default 2)",
    )
    health.add_argument(
        "--max-consecutive-quorum-errors",
        type=positive_int,
        default=2,
        metavar="N",
        help="failed checks in a row before the kvstore is unhealthy (default 2)",
    )
    health.add_argument(
        "--restart-delay",
        type=non_negative_float,
        default=1.0,
        metavar="S",
        help="base delay before reconnecting after a restart (default 1)",
    )
    health.add_argument(
        "--restart-spread",
        type=non_negative_float,
        default=5.0,
        metavar="S",
        help="extra per-node delay, up to this (hash of the node name; default 5)",
    )
    health.add_argument(
        "--restart-mode",
        choices=[m.value for m in RestartMode],
        default=RestartMode.INPROCESS.value,
        help=f"inprocess (default) or exit (exit status {EXIT_RESTART} for a supervisor)",
    )
    local = parser.add_argument_group("local")
    local.add_argument(
        "--api-socket",
        type=Path,
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"unix socket of the local API (default {DEFAULT_SOCKET})",
    )
    local.add_argument(
        "--metrics-address",
        type=_address,
        default=_address(DEFAULT_TELEMETRY),
        metavar="HOST:PORT",
        help=f"/metrics, /healthz, /readyz (default {DEFAULT_TELEMETRY}; 0 = ephemeral "
        "port, printed on startup; none = off)",
    )
    local.add_argument(
        "--cleanup-on-exit",
        action="store_true",
        help="on shutdown withdraw endpoints and node, revoke leases, remove the routes to "
        "other nodes and unpin the kernel maps (default: keep all, so forwarding continues "
        "while the agent is down)",
    )
    datapath = parser.add_argument_group("datapath")
    datapath.add_argument(
        "--datapath",
        choices=[m.value for m in DatapathMode],
        default=DatapathMode.AUTO.value,
        help="auto (default: kernel maps when root and eBPF work, else userspace), kernel "
        "(fail with exit status 2 when unavailable) or userspace",
    )
    datapath.add_argument(
        "--bpf-pin-dir",
        type=Path,
        default=DEFAULT_BPF_PIN_DIR,
        metavar="DIR",
        help=f"bpffs directory of the pinned cp_ipcache, shared with the tc program "
        f"(default {DEFAULT_BPF_PIN_DIR}); the map outlives the agent",
    )
    datapath.add_argument(
        "--routes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep a route to every other node's pod CIDR via that node's IP (default on; "
        "--cleanup-on-exit removes them)",
    )
    datapath.add_argument(
        "--routes-netns",
        default=None,
        metavar="NAME",
        help="program the routes inside this network namespace (/run/netns/NAME or a path) "
        "instead of the agent's own",
    )
    datapath.add_argument(
        "--cni-netns",
        default=None,
        metavar="NAME",
        help="run the CNI plugin (POST /v1/cni, called by the node's cp-cni) inside this "
        "network namespace (/run/netns/NAME or a path) instead of the agent's own",
    )
    datapath.add_argument(
        "--set-sysctls",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="at start set the sysctls the datapath needs (net.ipv4.ip_forward=1) when they "
        "differ (default off: check, warn in one line, report in cpctl status)",
    )
    datapath.add_argument(
        "--lb-cgroup",
        default="auto",
        metavar="DIR|auto|none",
        help="cgroup v2 directory whose processes get socket load balancing of services "
        "(kernel datapath; default auto: the cgroup v2 mount, i.e. every pod; none: keep the "
        "service maps but attach no program)",
    )
    flows = parser.add_argument_group("flow observability")
    flows.add_argument(
        "--flows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the flow server: datapath flow events into a ring, the Observer API (default on)",
    )
    flows.add_argument(
        "--flows-socket",
        type=_optional_path,
        default=DEFAULT_OBSERVER_SOCKET,
        metavar="PATH",
        help=f"unix socket of the Observer API (default {DEFAULT_OBSERVER_SOCKET}; none = off)",
    )
    flows.add_argument(
        "--flows-listen",
        type=_listen,
        default=None,
        metavar="HOST:PORT",
        help="also serve the Observer API on this TCP address (default: none)",
    )
    flows.add_argument(
        "--flows-tls-cert",
        type=Path,
        default=None,
        metavar="FILE",
        help="serve --flows-listen with TLS: this certificate (with --flows-tls-key)",
    )
    flows.add_argument("--flows-tls-key", type=Path, default=None, metavar="FILE", help="its key")
    flows.add_argument(
        "--flow-buffer-size",
        type=positive_int,
        default=DEFAULT_CAPACITY,
        metavar="N",
        help=f"flows the ring keeps (default {DEFAULT_CAPACITY})",
    )
    flows.add_argument(
        "--flow-aggregation",
        choices=[a.name.lower() for a in Aggregation],
        default="medium",
        help="what the datapath reports: medium (default: drops, new flows, TCP SYN/FIN/RST "
        "changes, a busy flow once per interval), none (every packet) or off",
    )
    flows.add_argument(
        "--flow-rate-limit",
        type=non_negative_int,
        default=_FLOW_DEFAULTS.rate_per_sec,
        metavar="N",
        help=f"flow events per second per CPU the datapath may emit (default "
        f"{_FLOW_DEFAULTS.rate_per_sec}; 0 = unlimited); the rest are counted lost",
    )
    flows.add_argument(
        "--flow-burst",
        type=positive_int,
        default=_FLOW_DEFAULTS.burst,
        metavar="N",
        help=f"burst of the rate limit (default {_FLOW_DEFAULTS.burst})",
    )
    flows.add_argument(
        "--flow-report-interval",
        type=positive_int,
        default=_FLOW_DEFAULTS.report_interval_s,
        metavar="S",
        help=f"medium: report a busy flow again at most every S seconds per direction "
        f"(default {_FLOW_DEFAULTS.report_interval_s})",
    )
    local.add_argument("-v", "--verbose", action="store_true", help="log debug details")


def build_parser() -> Parser:
    parser = Parser(
        prog="cp-agent",
        description="The control plane's node agent (CRD mode by default; kvstore mode "
        "with --store kvstore).",
        epilog=f"Exit status: 0 after SIGTERM/SIGINT, 1 on a fatal error, 2 on a bad flag or "
        f"--datapath kernel without usable kernel maps, "
        f"{EXIT_RESTART} when --restart-mode=exit and the kvstore went unhealthy.",
    )
    add_store_flags(parser, double_write=True)
    add_kvstore_flags(parser)
    add_agent_flags(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    host, port = args.metrics_address
    return AgentSettings(
        node=args.node_name or parse_node_name(default_node_name()),
        node_ips=args.node_ip or (parse_ip("127.0.0.1"),),
        cluster=args.cluster_name,
        pool=args.pool,
        lease_ttl=args.lease_ttl,
        heartbeat_interval=args.heartbeat_interval,
        status_check_interval=args.status_check_interval,
        quorum_check_timeout=args.quorum_check_timeout,
        max_consecutive_quorum_errors=args.max_consecutive_quorum_errors,
        restart_delay=args.restart_delay,
        restart_spread=args.restart_spread,
        restart_mode=RestartMode(args.restart_mode),
        api_socket=args.api_socket,
        telemetry_host=host,
        telemetry_port=port,
        cleanup_on_exit=args.cleanup_on_exit,
        datapath=DatapathMode(args.datapath),
        bpf_pin_dir=args.bpf_pin_dir,
        routes=args.routes,
        routes_netns=args.routes_netns or None,
        cni_netns=args.cni_netns or None,
        set_sysctls=args.set_sysctls,
        flows_enabled=args.flows,
        flows=FlowSettings(
            capacity=args.flow_buffer_size,
            aggregation=Aggregation[args.flow_aggregation.upper()],
            rate_per_sec=args.flow_rate_limit,
            burst=args.flow_burst,
            report_interval_s=args.flow_report_interval,
        ),
        flows_socket=args.flows_socket,
        flows_listen=args.flows_listen,
        flows_tls=_flows_tls(args.flows_tls_cert, args.flows_tls_key),
        lb_cgroup=_lb_cgroup(args.lb_cgroup),
    )


def _flows_tls(cert: Path | None, key: Path | None) -> tuple[Path, Path] | None:
    if (cert is None) != (key is None):
        raise ConfigError("--flows-tls-cert and --flows-tls-key go together")
    return None if cert is None or key is None else (cert, key)


def _lb_cgroup(text: str) -> Path | None:
    if text == "none":
        return None
    if text == "auto":
        return cgroup2_mount()
    return Path(text)
