"""Typed settings for the stores: the kvstore (loaded from flags, the environment or a YAML
file) and CRD mode's Kubernetes API.

Precedence: a flag beats the environment, which beats the file. A single cluster given by
``--kvstore-endpoints`` is the common case; the YAML file can describe several clusters
(with TLS and auth) and map each resource kind to a set of them (sharding).

YAML layout (keys follow Cilium's etcd config where they overlap)::

    prefix: cp/
    qps: 0              # client-side rate limit per cluster, 0 = none
    burst: 0
    clusters:
      - name: main
        endpoints: ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        trusted-ca-file: /etc/cp/etcd/ca.crt
        cert-file: /etc/cp/etcd/client.crt
        key-file: /etc/cp/etcd/client.key
        username: cp-agent
        password-file: /etc/cp/etcd/password
    shards:             # resource kind -> clusters; a missing kind uses the first cluster
      identities: [main, ids-b]

A file with a top-level ``endpoints:`` list (Cilium's single-cluster form) is accepted too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

RESOURCE_KINDS: tuple[str, ...] = ("identities", "endpoints", "nodes", "ipam")
"""The resource kinds that can be sharded over several etcd clusters."""

DEFAULT_CLUSTER = "default"
ENV_ENDPOINTS = "CP_KVSTORE_ENDPOINTS"
ENV_CONFIG = "CP_KVSTORE_CONFIG"
ENV_PREFIX = "CP_KVSTORE_PREFIX"


_CLUSTER_KEYS = frozenset(
    {
        "name",
        "endpoints",
        "trusted-ca-file",
        "cert-file",
        "key-file",
        "server-name",
        "username",
        "password",
        "password-file",
    }
)
_TOP_KEYS = frozenset(
    {"prefix", "qps", "burst", "clusters", "shards", "request-timeout", "dial-timeout"}
)


class ConfigError(ValueError):
    """A setting is missing or malformed; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Client TLS towards one etcd cluster."""

    ca_file: Path | None = None
    """CA bundle that signs the servers' certificates; None uses the system roots."""
    cert_file: Path | None = None
    """Client certificate for etcd's client-cert-auth."""
    key_file: Path | None = None
    """Private key of ``cert_file``."""
    server_name: str | None = None
    """Name to verify in the server certificate when endpoints are IP addresses."""


@dataclass(frozen=True, slots=True)
class EtcdClusterConfig:
    """How to reach one etcd cluster."""

    name: str
    """Name used by the shard map and in health output."""
    endpoints: tuple[str, ...]
    """Client URLs (``http://`` or ``https://``) of its members."""
    tls: TLSConfig | None = None
    """Client TLS; required when an endpoint is ``https://``."""
    username: str | None = None
    """etcd user for password auth."""
    password: str | None = field(default=None, repr=False)
    """Password of ``username``."""


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Behaviour of the client towards every cluster."""

    request_timeout: float = 5.0
    """Deadline of one unary request, in seconds."""
    dial_timeout: float = 5.0
    """How long to wait for a connection before a request fails as unreachable."""
    qps: float = 0.0
    """Client-side rate limit in requests per second per cluster; 0 disables it."""
    burst: int = 0
    """Requests allowed at once above the rate; defaults to ``qps`` when 0."""
    keepalive_time: float = 10.0
    """gRPC keepalive ping interval, seconds; etcd refuses pings more often than 5 s."""
    keepalive_timeout: float = 5.0
    """A ping unanswered this long declares the connection dead."""
    require_leader: bool = True
    """Watches and lease keepalives fail on a member that lost its leader."""


@dataclass(frozen=True, slots=True)
class KvstoreConfig:
    """Every etcd cluster the control plane uses and how resources map onto them."""

    clusters: tuple[EtcdClusterConfig, ...]
    """At least one cluster; the first is the default for unmapped kinds."""
    shards: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Resource kind -> names of the clusters that hold it."""
    prefix: str = "cp/"
    """Prefix of every key the control plane writes."""
    client: ClientSettings = field(default_factory=ClientSettings)
    """Client behaviour (timeouts, rate limit, keepalive)."""

    def cluster(self, name: str) -> EtcdClusterConfig:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise ConfigError(f"unknown etcd cluster {name!r}")

    def clusters_for(self, kind: str) -> tuple[str, ...]:
        """Names of the clusters that hold ``kind``, in shard order."""
        if kind not in RESOURCE_KINDS:
            raise ConfigError(f"unknown resource kind {kind!r}")
        return self.shards.get(kind) or (self.clusters[0].name,)


def parse_endpoints(text: str) -> tuple[str, ...]:
    """Split a comma list of endpoints and check each is an http(s) URL with a port."""
    endpoints = tuple(part.strip() for part in text.split(",") if part.strip())
    if not endpoints:
        raise ConfigError("no kvstore endpoints given")
    for endpoint in endpoints:
        check_endpoint(endpoint)
    return endpoints


def check_endpoint(endpoint: str) -> None:
    if "://" not in endpoint:
        raise ConfigError(f"endpoint {endpoint!r}: want a URL like http://127.0.0.1:2379")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"endpoint {endpoint!r}: scheme must be http or https")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"endpoint {endpoint!r}: bad port") from exc
    if not parts.hostname or port is None:
        raise ConfigError(f"endpoint {endpoint!r}: want host:port")


def load_kvstore_config(
    endpoints: str | None = None,
    config_file: str | None = None,
    prefix: str | None = None,
    env: Mapping[str, str] | None = None,
) -> KvstoreConfig:
    """Build the kvstore settings from flags, then the environment, then a file."""
    environ = os.environ if env is None else env
    endpoints = endpoints or environ.get(ENV_ENDPOINTS) or None
    config_file = config_file or environ.get(ENV_CONFIG) or None
    prefix = prefix or environ.get(ENV_PREFIX) or None
    if endpoints:
        config = KvstoreConfig(
            clusters=(EtcdClusterConfig(DEFAULT_CLUSTER, parse_endpoints(endpoints)),)
        )
        if config_file:
            # Endpoints given on the command line replace the file's first cluster's.
            file_config = load_config_file(Path(config_file))
            first = file_config.clusters[0]
            clusters = (
                EtcdClusterConfig(
                    first.name,
                    config.clusters[0].endpoints,
                    first.tls,
                    first.username,
                    first.password,
                ),
                *file_config.clusters[1:],
            )
            config = KvstoreConfig(
                clusters, file_config.shards, file_config.prefix, file_config.client
            )
    elif config_file:
        config = load_config_file(Path(config_file))
    else:
        raise ConfigError(
            f"no kvstore given: use --kvstore-endpoints, --kvstore-config, or set {ENV_ENDPOINTS}"
        )
    if prefix:
        config = KvstoreConfig(
            config.clusters, config.shards, normalize_prefix(prefix), config.client
        )
    return config


def normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip()
    if not prefix or prefix == "/":
        raise ConfigError("kvstore prefix must not be empty")
    return prefix if prefix.endswith("/") else prefix + "/"


def load_config_file(path: Path) -> KvstoreConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read kvstore config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"kvstore config {path} is not valid YAML{where}") from exc
    try:
        return config_from_mapping(data, base=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"kvstore config {path}: {exc}") from exc


def config_from_mapping(data: Any, base: Path = Path()) -> KvstoreConfig:
    if not isinstance(data, Mapping):
        raise ConfigError("top level must be a mapping")
    known = _TOP_KEYS | (set() if "clusters" in data else _CLUSTER_KEYS)
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"unknown key(s): {', '.join(unknown)}")
    if "clusters" in data:
        raw_clusters = data["clusters"]
        if not isinstance(raw_clusters, list) or not raw_clusters:
            raise ConfigError("clusters must be a non-empty list")
        clusters = tuple(_cluster(c, base, i, True) for i, c in enumerate(raw_clusters))
    elif "endpoints" in data:
        clusters = (_cluster(data, base, 0, False),)
    else:
        raise ConfigError("give clusters or endpoints")
    names = [c.name for c in clusters]
    if len(set(names)) != len(names):
        raise ConfigError("cluster names must be unique")
    shards = _shards(data.get("shards", {}), set(names))
    client = ClientSettings(
        request_timeout=_number(data, "request-timeout", 5.0, positive=True),
        dial_timeout=_number(data, "dial-timeout", 5.0, positive=True),
        qps=_number(data, "qps", 0.0),
        burst=int(_number(data, "burst", 0)),
    )
    prefix = normalize_prefix(_string(data, "prefix") or "cp/")
    return KvstoreConfig(clusters=clusters, shards=shards, prefix=prefix, client=client)


def _cluster(data: Any, base: Path, index: int, nested: bool) -> EtcdClusterConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"cluster #{index + 1} must be a mapping")
    name = _string(data, "name") or (DEFAULT_CLUSTER if index == 0 else f"cluster-{index + 1}")
    if nested:
        unknown = sorted(str(k) for k in data if k not in _CLUSTER_KEYS)
        if unknown:
            raise ConfigError(f"cluster {name!r}: unknown key(s): {', '.join(unknown)}")
    raw = data.get("endpoints")
    if isinstance(raw, str):
        endpoints = parse_endpoints(raw)
    elif isinstance(raw, list) and raw and all(isinstance(e, str) for e in raw):
        endpoints = parse_endpoints(",".join(raw))
    else:
        raise ConfigError(f"cluster {name!r}: endpoints must be a non-empty list of URLs")
    ca, cert, key = (_path(data, k, base) for k in ("trusted-ca-file", "cert-file", "key-file"))
    if (cert is None) != (key is None):
        raise ConfigError(f"cluster {name!r}: cert-file and key-file go together")
    tls = None
    if (
        ca
        or cert
        or _string(data, "server-name")
        or any(e.startswith("https://") for e in endpoints)
    ):
        tls = TLSConfig(ca, cert, key, _string(data, "server-name"))
    username = _string(data, "username")
    password = _string(data, "password")
    password_file = _path(data, "password-file", base)
    if password_file is not None:
        try:
            password = password_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cluster {name!r}: cannot read password-file: {exc.strerror}"
            ) from exc
    if (username is None) != (password is None):
        raise ConfigError(f"cluster {name!r}: username and password go together")
    return EtcdClusterConfig(name, endpoints, tls, username, password)


def _shards(data: Any, names: set[str]) -> dict[str, tuple[str, ...]]:
    if not isinstance(data, Mapping):
        raise ConfigError("shards must map resource kinds to lists of cluster names")
    shards: dict[str, tuple[str, ...]] = {}
    for kind, clusters in data.items():
        if kind not in RESOURCE_KINDS:
            raise ConfigError(
                f"shards: unknown resource kind {kind!r} (known: {', '.join(RESOURCE_KINDS)})"
            )
        if isinstance(clusters, str):
            clusters = [clusters]
        if not isinstance(clusters, Sequence) or not clusters:
            raise ConfigError(f"shards.{kind} must be a non-empty list of cluster names")
        for name in clusters:
            if name not in names:
                raise ConfigError(f"shards.{kind}: unknown cluster {name!r}")
        if len(set(clusters)) != len(clusters):
            raise ConfigError(f"shards.{kind}: a cluster is listed twice")
        shards[kind] = tuple(clusters)
    return shards


def _string(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string")
    return value


def _path(data: Mapping[str, Any], key: str, base: Path) -> Path | None:
    value = _string(data, key)
    if value is None:
        return None
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(f"{key}: no such file {path}")
    return path


def _number(data: Mapping[str, Any], key: str, default: float, positive: bool = False) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{key} must be a non-negative number")
    if positive and value == 0:
        raise ConfigError(f"{key} must be positive")
    return float(value)


@dataclass(frozen=True, slots=True)
class CrdConfig:
    """CRD mode: the store is the Kubernetes API named by a kubeconfig (or the pod's
    service account)."""

    kubeconfig: str | None = None
    """A kubeconfig file (or a colon-separated list); None: $KUBECONFIG, ~/.kube/config,
    then in-cluster."""
    context: str | None = None
    request_timeout: float = 10.0
    """Deadline of each API request (a watch's is its idle timeout instead)."""
