"""CRD mode for the harness: the local API server process, the invariants read from the
Kubernetes objects, the operator leader from its Lease, malformed objects.

The objects are read as JSON (no decoding by the product's own readers): an object whose
fields do not make sense (the malformed-objects fault writes some) is counted, not
judged, as the daemons must skip it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from controlplane.config import ConfigError
from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.errors import AlreadyExists, CrdError
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.resources import (
    ENDPOINTS,
    IDENTITIES,
    LEASES,
    NAMESPACES,
    NODES,
    OPERATOR_LEASE,
    POD_CIDRS,
)
from controlplane.processes import Daemon
from controlplane.scale.invariants import StoreView

LEASE_NAMESPACE = "kube-system"
MALFORMED_PREFIX = "zz-malformed"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def apiserver(data_dir: Path, etcd_urls: list[str], port: int, log_dir: Path) -> Daemon:
    """`cpctl kube up` on the harness's etcd; the same port and data directory (PKI, token,
    kubeconfig) on every start, so clients keep their configuration across a restart."""
    return Daemon(
        "apiserver",
        "controlplane.cli.main",
        [
            "kube",
            "up",
            f"--port={port}",
            f"--data-dir={data_dir}",
            f"--etcd-endpoints={','.join(etcd_urls)}",
            "--no-endpointslice-controller",
        ],
        log_dir / "apiserver.log",
    )


def client(kubeconfig: Path) -> KubeClient:
    return KubeClient(load_connection(str(kubeconfig)))


async def wait_serving(kubeconfig: Path, timeout: float = 60.0) -> float:
    """Until the API server answers a list; how long that took."""
    start = time.monotonic()
    while True:
        # ConfigError: no kubeconfig yet (the server writes it once it serves)
        with contextlib.suppress(CrdError, OSError, ConfigError, TimeoutError):
            async with client(kubeconfig) as kube:
                await kube.list(NAMESPACES)
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"the API server did not answer within {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def ensure_namespace(kubeconfig: Path, name: str) -> None:
    """The namespace the workers' endpoints live in (the API server wants it to exist)."""
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    async with client(kubeconfig) as kube:
        with contextlib.suppress(AlreadyExists):
            await kube.create(NAMESPACES, body)


async def operator_leader(kubeconfig: Path) -> str | None:
    async with client(kubeconfig) as kube:
        lease = await kube.get_or_none(LEASES, OPERATOR_LEASE, LEASE_NAMESPACE)
    if lease is None:
        return None
    holder = lease.get("spec", {}).get("holderIdentity")
    return str(holder) if holder else None


def _node_cidrs(
    pod_cidrs: list[JSON], view: StoreView
) -> dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    bad = view.violations
    claimed: dict[str, str] = {}
    cidr_of: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = defaultdict(list)
    for obj in pod_cidrs:
        spec = obj.get("spec", {})
        try:
            network = ipaddress.ip_network(spec["cidr"])
            node = str(spec["node"])
        except (KeyError, TypeError, ValueError):
            view.malformed += 1
            continue
        if str(network) in claimed:
            bad["cidr"].append(f"CIDR {network} claimed twice")
        claimed[str(network)] = node
        cidr_of[node].append(network)
    networks = sorted(ipaddress.ip_network(c) for c in claimed)
    for a, b in itertools.pairwise(networks):
        if a.overlaps(b):
            bad["cidr"].append(f"CIDRs {a} and {b} overlap")
    view.counts["cidrs"] = len(claimed)
    return cidr_of


async def read_crd_store(kubeconfig: Path) -> StoreView:
    """The invariants of :func:`controlplane.scale.invariants.read_store`, from the
    Identity, PodCIDR and Endpoint objects."""
    view = StoreView()
    bad = view.violations
    async with client(kubeconfig) as kube:
        identities = (await kube.list(IDENTITIES)).items
        pod_cidrs = (await kube.list(POD_CIDRS)).items
        endpoints = (await kube.list(ENDPOINTS)).items
    ids: dict[int, str] = {}
    by_labels: dict[str, int] = {}
    for obj in identities:
        try:
            ident = int(obj["metadata"]["name"])
            labels = ";".join(sorted(obj["spec"]["labels"]))
        except (KeyError, TypeError, ValueError):
            view.malformed += 1
            continue
        if labels in by_labels:
            bad["identity"].append(f"labels {labels} have IDs {by_labels[labels]}, {ident}")
        by_labels[labels] = ident
        ids[ident] = labels
    view.counts["identities"] = len(ids)
    cidr_of = _node_cidrs(pod_cidrs, view)
    for obj in endpoints:
        spec = obj.get("spec", {})
        try:
            (address,) = [a for a in spec["addressing"] if a.get("family") == "IPv4"]
            ip = ipaddress.ip_address(address["ip"])
            key = f"{ip}/{int(address['prefixLen'])}"
            ident = int(spec["identity"]["id"])
            node = str(spec["node"])
        except (KeyError, TypeError, ValueError):
            view.malformed += 1
            continue
        if key in view.endpoints:
            bad["ip"].append(f"IP {key} held by two endpoint objects")
        view.endpoints[key] = (node, ident)
        view.by_node[node].append(key)
        if not any(ip in net for net in cidr_of.get(node, [])):
            bad["ip"].append(f"{key} of {node} outside its node's CIDR")
        if ident not in ids and ident >= 256:
            bad["identity"].append(f"{key} has identity {ident}, not stored")
    view.counts["endpoints"] = len(view.endpoints)
    return view


def malformed_objects() -> list[tuple[Any, JSON]]:
    """Objects the schema admits but no reader can use: an endpoint without an IP of its
    own, an identity whose name is no number, a node with a garbage address, a PodCIDR
    that is no network."""
    return [
        (
            ENDPOINTS,
            {
                "apiVersion": ENDPOINTS.api_version,
                "kind": ENDPOINTS.kind,
                "metadata": {"name": MALFORMED_PREFIX, "namespace": "default"},
                "spec": {
                    "addressing": [{"family": "IPv4", "ip": "not-an-ip", "prefixLen": 32}],
                    "identity": {"id": 70000},
                    "node": "zz malformed",
                },
            },
        ),
        (
            IDENTITIES,
            {
                "apiVersion": IDENTITIES.api_version,
                "kind": IDENTITIES.kind,
                "metadata": {"name": MALFORMED_PREFIX},
                "spec": {"labels": ["k8s:app=zz-malformed"]},
            },
        ),
        (
            NODES,
            {
                "apiVersion": NODES.api_version,
                "kind": NODES.kind,
                "metadata": {"name": MALFORMED_PREFIX},
                "spec": {"addresses": [{"ip": "not-an-ip"}], "bootID": "has spaces!"},
            },
        ),
        (
            POD_CIDRS,
            {
                "apiVersion": POD_CIDRS.api_version,
                "kind": POD_CIDRS.kind,
                "metadata": {"name": MALFORMED_PREFIX},
                "spec": {"cidr": "10.255.0.0/33", "node": MALFORMED_PREFIX},
            },
        ),
    ]


async def write_malformed(kubeconfig: Path) -> list[str]:
    """Create the malformed objects the API server admits; their kinds."""
    written = []
    async with client(kubeconfig) as kube:
        for resource, body in malformed_objects():
            try:
                await kube.create(resource, body)
            except CrdError:
                continue  # the schema refused it: nothing for the daemons to skip
            written.append(resource.kind)
    return written


async def delete_malformed(kubeconfig: Path) -> None:
    async with client(kubeconfig) as kube:
        for resource, body in malformed_objects():
            with contextlib.suppress(CrdError):
                await kube.delete(
                    resource, MALFORMED_PREFIX, namespace=body["metadata"].get("namespace")
                )
