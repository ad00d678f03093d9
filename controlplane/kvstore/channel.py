"""gRPC channels to etcd: several endpoints, TLS, keepalive and fast reconnects.

aetcd opens one insecure channel to one address; this factory builds the channel we hand
to its generated stubs instead. Several members go into one ``ipv4:``/``ipv6:`` target
(grpc's pick_first then fails over to the next address on its own).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from controlplane.config import ClientSettings, ConfigError, EtcdClusterConfig, TLSConfig

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    target: str
    """The grpc target string, e.g. ``ipv4:127.0.0.1:2379,127.0.0.1:22379``."""
    secure: bool
    first_host: str


async def resolve_target(endpoints: Sequence[str]) -> ResolvedTarget:
    """Turn client URLs into one grpc target; host names are resolved here."""
    schemes = {urlsplit(e).scheme for e in endpoints}
    if len(schemes) != 1:
        raise ConfigError("endpoints of one cluster must all be http or all https")
    loop = asyncio.get_running_loop()
    v4: list[str] = []
    v6: list[str] = []
    first_host = ""
    for endpoint in endpoints:
        parts = urlsplit(endpoint)
        host, port = parts.hostname or "", parts.port
        first_host = first_host or host
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise ConfigError(f"cannot resolve etcd endpoint {endpoint}: {exc}") from exc
            address = ipaddress.ip_address(infos[0][4][0])
        if address.version == 4:
            v4.append(f"{address}:{port}")
        else:
            v6.append(f"[{address}]:{port}")
    if v4 and v6:
        raise ConfigError("endpoints of one cluster must all be IPv4 or all IPv6")
    target = f"ipv4:{','.join(v4)}" if v4 else f"ipv6:{','.join(v6)}"
    return ResolvedTarget(target, schemes == {"https"}, first_host)


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def channel_options(
    settings: ClientSettings, *, own_connection: bool = False
) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # grpc's default backoff grows to two minutes; a recovering etcd should be found fast.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),
    ]
    if own_connection:
        # Without this, clients in one process to the same address share one connection.
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


async def open_channel(
    cluster: EtcdClusterConfig,
    settings: ClientSettings,
    *,
    endpoints: Sequence[str] | None = None,
    own_connection: bool = False,
) -> grpc.aio.Channel:
    """Open a channel to ``endpoints`` (default: all of the cluster's)."""
    resolved = await resolve_target(endpoints or cluster.endpoints)
    options = channel_options(settings, own_connection=own_connection)
    if not resolved.secure:
        if cluster.tls is not None and (cluster.tls.cert_file or cluster.tls.ca_file):
            raise ConfigError(
                f"cluster {cluster.name!r}: TLS files given but endpoints are http://"
            )
        return grpc.aio.insecure_channel(resolved.target, options=options)
    tls = cluster.tls or TLSConfig()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )
    options.append(("grpc.ssl_target_name_override", tls.server_name or resolved.first_host))
    return grpc.aio.secure_channel(resolved.target, credentials, options=options)
