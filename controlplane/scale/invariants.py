"""The invariants, read from the store directly (every shard), after every fault.

- identities: one numeric ID per label set and one label set per ID (the labels index and
  the master keys agree both ways), no ID on two shards;
- IPs: no IP held by two endpoint records (across shards) or leased to two nodes; every
  endpoint IP inside its node's CIDR; no CIDR claimed for two nodes or twice;
- nothing a live agent owns is lost: each agent's owned endpoints are in the store;
- the truth every agent's ipcache must converge to: the set of (IP/prefix, identity)
  of the endpoint records, as a digest the workers compute the same way.

Values that do not decode (the malformed-values fault writes some) are counted, not
judged: the daemons must skip them, and so does this reader.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from controlplane import codec
from controlplane.config import KvstoreConfig
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.scale.worker import endpoint_digest, entry_bytes

LAYOUT = KeyLayout()


@dataclass
class StoreView:
    endpoints: dict[str, tuple[str, int]] = field(default_factory=dict)
    """"ip/prefix" -> (node, identity)."""
    by_node: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[str, int] = field(default_factory=dict)
    malformed: int = 0

    @functools.cached_property
    def truth(self) -> str:
        """The digest every ipcache must reach; computed once (10k endpoints cost ~0.2 s,
        and the convergence loop compares it with every agent's ten times a second: as a
        plain property that blocked the harness, and the proxies in it, for ~30 s a
        loop, so every agent's quorum reads timed out and all restarted)."""
        return endpoint_digest(entry_bytes(p, i) for p, (_, i) in self.endpoints.items())

    def owned_digest(self, node: str) -> str:
        ips = sorted(p.split("/")[0] for p in self.by_node.get(node, []))
        return hashlib.sha256("\n".join(ips).encode()).hexdigest()[:16]


def _decode(kind: str, raw: bytes, view: StoreView) -> Any:
    try:
        return codec.decode(kind, raw)
    except codec.DecodeError:
        view.malformed += 1
        return None


async def read_store(config: KvstoreConfig, cluster_name: str = "default") -> StoreView:
    view = StoreView()
    bad = view.violations
    async with ShardMap(config, own_connection=True) as shards:
        # identities: index labels -> id, master id -> labels, on every identity shard
        index: dict[str, int] = {}
        masters: dict[int, str] = {}
        for backend in shards.shards("identities"):
            for kv in (await backend.list_prefix(LAYOUT.identity_labels_prefix)).kvs:
                label_key = kv.key[len(LAYOUT.identity_labels_prefix) :].decode()
                data = _decode("identity-index", kv.value, view)
                if data is None:
                    continue
                if label_key in index:
                    bad["identity"].append(f"label set {label_key} indexed on two shards")
                index[label_key] = int(data["id"])
            for kv in (await backend.list_prefix(LAYOUT.identity_id_prefix)).kvs:
                data = _decode("identity", kv.value, view)
                if data is None:
                    continue
                ident = int(data["id"])
                canonical = ";".join(sorted(data["labels"]))
                if ident in masters:
                    bad["identity"].append(f"ID {ident} on two shards")
                masters[ident] = canonical
        label_of_index: dict[int, str] = {}
        for label_key, ident in index.items():
            if ident in label_of_index:
                bad["identity"].append(f"ID {ident} indexed by two label sets")
            label_of_index[ident] = label_key
            master = masters.get(ident)
            if master is None:
                bad["identity"].append(f"index {label_key} -> ID {ident} without a master key")
            elif not label_key.startswith("sha256:") and master != label_key:
                bad["identity"].append(f"ID {ident}: index says {label_key}, master {master}")
        seen_labels: dict[str, int] = {}
        for ident, labels in masters.items():
            if labels in seen_labels:
                bad["identity"].append(f"labels {labels} have IDs {seen_labels[labels]}, {ident}")
            seen_labels[labels] = ident
        view.counts["identities"] = len(masters)

        # CIDR claims: cidr -> node, on the ipam shards
        cidr_of: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = defaultdict(list)
        claimed: dict[str, str] = {}
        for backend in shards.shards("ipam"):
            prefix = LAYOUT.ipam_cidr_prefix("default")
            for kv in (await backend.list_prefix(prefix)).kvs:
                data = _decode("cidr-claim", kv.value, view)
                if data is None:
                    continue
                cidr = kv.key[len(prefix) :].decode().replace("_", "/")
                if cidr in claimed:
                    bad["cidr"].append(f"CIDR {cidr} claimed twice")
                claimed[cidr] = data["node"]
                cidr_of[data["node"]].append(ipaddress.ip_network(cidr))
        networks = sorted(ipaddress.ip_network(c) for c in claimed)
        for a, b in itertools.pairwise(networks):
            if a.overlaps(b):
                bad["cidr"].append(f"CIDRs {a} and {b} overlap")
        view.counts["cidrs"] = len(claimed)

        # endpoints: ip -> node, identity; across every endpoint shard
        for backend in shards.shards("endpoints"):
            prefix = LAYOUT.ip_prefix(cluster_name)
            for kv in (await backend.list_prefix(prefix)).kvs:
                data = _decode("endpoint", kv.value, view)
                if data is None:
                    continue
                key = f"{data['ip']}/{data['prefix_len']}"
                if key in view.endpoints:
                    bad["ip"].append(f"IP {key} held by two endpoint records")
                view.endpoints[key] = (data["node"], int(data["identity"]))
                view.by_node[data["node"]].append(key)
                ip = ipaddress.ip_address(data["ip"])
                if not any(ip in net for net in cidr_of.get(data["node"], [])):
                    bad["ip"].append(f"{key} of {data['node']} outside its node's CIDR")
                if int(data["identity"]) not in masters and int(data["identity"]) >= 256:
                    bad["identity"].append(f"{key} has identity {data['identity']}, not stored")
        view.counts["endpoints"] = len(view.endpoints)

        # IP leases: node/ip; one node per IP
        lessee: dict[str, str] = {}
        for backend in shards.shards("ipam"):
            prefix = LAYOUT.ipam_leases_prefix
            for kv in (await backend.list_prefix(prefix)).kvs:
                if _decode("ip-lease", kv.value, view) is None:
                    continue
                node, _, address = kv.key[len(prefix) :].decode().partition("/")
                if address in lessee and lessee[address] != node:
                    bad["ip"].append(f"IP {address} leased to {lessee[address]} and {node}")
                lessee[address] = node
        view.counts["ip_leases"] = len(lessee)
    return view
