"""``cp-cni``: the CNI plugin (spec 1.0; results also in 0.4.0 form).

Invoked by the container runtime with the ``CNI_*`` environment and the network
configuration as JSON on stdin. Our configuration fields, besides ``cniVersion``, ``name``
and ``type``::

    agentSocket  the agent's local API socket        (default /var/run/cp/agent.sock)
    pinDir       where the datapath maps are pinned  (default /sys/fs/bpf/cp)
    mtu          MTU of both veth ends               (default: the kernel's)
    labels       endpoint labels, e.g. ["k8s:app=web"] (added to CNI_ARGS CP_LABELS)
    bpfObject    the datapath object to load (default: $CP_BPF_OBJECT, else the one
                 built into the package, or a source tree's bpf/cp_datapath.o)

The endpoint is ``K8S_POD_NAMESPACE/K8S_POD_NAME`` from ``CNI_ARGS`` (``default`` and the
container id when absent).

- ADD: the agent leases the IP and identity (``POST /v1/endpoints``); a veth pair is made
  (host side ``cp<11 hex of the container id's hash>``, the peer moved into ``CNI_NETNS``
  as ``CNI_IFNAME``), addressed and routed (see :mod:`controlplane.cni.netlink`), and the
  tc program for the endpoint is attached to the host side. Prints the result.
- DEL: idempotent: detach, delete the host veth (the peer goes with it), withdraw the
  endpoint from the agent; anything already gone is fine.
- CHECK: the agent knows the endpoint, the host veth exists with the program attached,
  and the pod interface holds the address.
- VERSION: the supported versions.

Any failure prints a CNI error ``{"cniVersion", "code", "msg", "details"}`` on stdout
and exits 1; diagnostics (libbpf's log) go to stderr.

On a node the runtime does not run this module: it runs the static launcher
(``cni/cp-cni-shim.c``), which hands the call to the agent (``POST /v1/cni``), which runs
this module with the same environment and stdin (:mod:`controlplane.agent.cni_runner`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any, Final, TextIO

from controlplane.cni import netlink
from controlplane.cni.agent_client import AgentUnavailable, request
from controlplane.model import IPAddress

__all__ = ["SUPPORTED_VERSIONS", "CNIError", "NetConf", "main", "run"]

SUPPORTED_VERSIONS: Final = ("0.4.0", "1.0.0")
DEFAULT_AGENT_SOCKET: Final = Path("/var/run/cp/agent.sock")
DEFAULT_PIN_DIR: Final = Path("/sys/fs/bpf/cp")

# Well-known error codes of the spec, then ours (100+).
E_INCOMPATIBLE_VERSION: Final = 1
E_UNSUPPORTED_FIELD: Final = 2
E_UNKNOWN_CONTAINER: Final = 3
E_INVALID_ENV: Final = 4
E_IO: Final = 5
E_DECODE: Final = 6
E_INVALID_CONFIG: Final = 7
E_TRY_AGAIN: Final = 11
E_AGENT: Final = 100
E_NETLINK: Final = 101
E_DATAPATH: Final = 102
E_CHECK: Final = 103
E_INTERNAL: Final = 999


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


@dataclass(frozen=True, slots=True)
class NetConf:
    cni_version: str
    name: str
    type: str
    agent_socket: Path = DEFAULT_AGENT_SOCKET
    pin_dir: Path = DEFAULT_PIN_DIR
    mtu: int | None = None
    labels: tuple[str, ...] = ()
    bpf_object: Path | None = None
    prev_result: Mapping[str, Any] | None = None


def _decode(stdin: str) -> dict[str, Any]:
    try:
        data = json.loads(stdin)
    except ValueError as e:
        raise CNIError(E_DECODE, "network configuration is not JSON", str(e)) from None
    if not isinstance(data, dict):
        raise CNIError(E_DECODE, "network configuration must be a JSON object")
    return data


def _str_field(data: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value:
        raise CNIError(E_INVALID_CONFIG, f"network configuration: {key} must be a non-empty string")
    return value


def parse_netconf(data: Mapping[str, Any]) -> NetConf:
    version = _str_field(data, "cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            E_INCOMPATIBLE_VERSION,
            f"unsupported cniVersion {version!r}",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    mtu = data.get("mtu")
    if mtu is not None and (
        not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535
    ):
        raise CNIError(E_INVALID_CONFIG, "network configuration: mtu must be 68..65535")
    labels = data.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise CNIError(E_INVALID_CONFIG, "network configuration: labels must be a string list")
    bpf_object = data.get("bpfObject")
    if bpf_object is not None and (not isinstance(bpf_object, str) or not bpf_object):
        raise CNIError(E_INVALID_CONFIG, "network configuration: bpfObject must be a path")
    prev = data.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CNIError(E_INVALID_CONFIG, "network configuration: prevResult must be an object")
    return NetConf(
        cni_version=version,
        name=_str_field(data, "name"),
        type=_str_field(data, "type"),
        agent_socket=Path(_str_field(data, "agentSocket", str(DEFAULT_AGENT_SOCKET))),
        pin_dir=Path(_str_field(data, "pinDir", str(DEFAULT_PIN_DIR))),
        mtu=mtu,
        labels=tuple(labels),
        bpf_object=Path(bpf_object) if bpf_object is not None else None,
        prev_result=prev,
    )


def parse_cni_args(text: str) -> dict[str, str]:
    """``K1=V1;K2=V2`` (a value may hold ``=``, e.g. ``CP_LABELS=k8s:app=web``)."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise CNIError(E_INVALID_ENV, f"CNI_ARGS: bad pair {part!r} (want KEY=VALUE)")
        out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True, slots=True)
class Invocation:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE") or "default"

    @property
    def name(self) -> str:
        return self.args.get("K8S_POD_NAME") or self.container_id

    def labels(self, conf: NetConf) -> list[str]:
        extra = [x.strip() for x in self.args.get("CP_LABELS", "").split(",") if x.strip()]
        return list(dict.fromkeys([*conf.labels, *extra]))


def _invocation(env: Mapping[str, str]) -> Invocation:
    command = env.get("CNI_COMMAND", "")
    if command not in ("ADD", "DEL", "CHECK", "VERSION"):
        raise CNIError(E_INVALID_ENV, f"CNI_COMMAND {command!r}: want ADD, DEL, CHECK or VERSION")
    inv = Invocation(
        command,
        env.get("CNI_CONTAINERID", ""),
        env.get("CNI_NETNS", ""),
        env.get("CNI_IFNAME", ""),
        parse_cni_args(env.get("CNI_ARGS", "")),
    )
    needed = ["CNI_CONTAINERID", "CNI_IFNAME"] + (["CNI_NETNS"] if command != "DEL" else [])
    missing = [k for k in needed if not env.get(k)]
    if missing:
        raise CNIError(E_INVALID_ENV, f"{command}: missing {', '.join(missing)}")
    if len(inv.ifname) > 15 or "/" in inv.ifname or inv.ifname in (".", ".."):
        raise CNIError(E_INVALID_ENV, f"CNI_IFNAME {inv.ifname!r} is not a valid name")
    return inv


def _endpoint_path(inv: Invocation) -> str:
    return f"/v1/endpoints/{inv.namespace}/{inv.name}"


def _agent(conf: NetConf, method: str, target: str, body: Any = None) -> tuple[int, Any]:
    try:
        return request(conf.agent_socket, method, target, body)
    except AgentUnavailable as e:
        raise CNIError(E_TRY_AGAIN, "the cp agent is not reachable", str(e)) from None


def _agent_error(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return str(body)


def endpoint_offset(ip: IPAddress, cidr: str) -> int:
    """The endpoint id: the IP's offset inside the node's pod CIDR."""
    net = ip_network(cidr)
    if ip.version != net.version or ip not in net:
        raise CNIError(E_AGENT, f"endpoint IP {ip} is outside the node's pod CIDR {cidr}")
    return int(ip) - int(net.network_address)


def _endpoint_id(conf: NetConf, endpoint: Mapping[str, Any], ip: IPAddress) -> int:
    eid = endpoint.get("endpoint_id")
    if isinstance(eid, int) and not isinstance(eid, bool):
        return eid
    status, body = _agent(conf, "GET", "/v1/status")
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("cidr"), str):
        raise CNIError(E_AGENT, "the agent reports no pod CIDR", _agent_error(body))
    return endpoint_offset(ip, body["cidr"])


def _result(conf: NetConf, inv: Invocation, link: netlink.PodLink) -> dict[str, Any]:
    plen = 128 if link.ip.version == 6 else 32
    ip_entry: dict[str, Any] = {
        "address": f"{link.ip}/{plen}",
        "gateway": str(link.gateway),
        "interface": 1,
    }
    if conf.cni_version == "0.4.0":
        ip_entry = {"version": str(link.ip.version), **ip_entry}
    return {
        "cniVersion": conf.cni_version,
        "interfaces": [
            {"name": link.host_ifname, "mac": link.host_mac},
            {"name": link.pod_ifname, "mac": link.pod_mac, "sandbox": inv.netns},
        ],
        "ips": [ip_entry],
        "routes": [
            {"dst": "::/0" if link.ip.version == 6 else "0.0.0.0/0", "gw": str(link.gateway)}
        ],
        "dns": {},
    }


def cmd_add(conf: NetConf, inv: Invocation) -> dict[str, Any]:
    from controlplane.datapath import loader

    if not os.path.exists(inv.netns):
        raise CNIError(E_UNKNOWN_CONTAINER, f"network namespace {inv.netns} does not exist")
    status, endpoint = _agent(
        conf,
        "POST",
        "/v1/endpoints",
        {"namespace": inv.namespace, "name": inv.name, "labels": inv.labels(conf)},
    )
    if status not in (200, 201) or not isinstance(endpoint, dict):
        code = E_TRY_AGAIN if status == 503 else E_AGENT
        raise CNIError(code, f"the agent refused endpoint {inv.namespace}/{inv.name}",
                       f"HTTP {status}: {_agent_error(endpoint)}")  # fmt: skip
    created = status == 201
    try:
        try:
            ip = ip_address(str(endpoint.get("ip")))
        except ValueError:
            raise CNIError(E_AGENT, "the agent returned no IP", json.dumps(endpoint)) from None
        eid = _endpoint_id(conf, endpoint, ip)
        try:
            link = netlink.setup_pod(inv.container_id, inv.netns, inv.ifname, ip, mtu=conf.mtu)
        except netlink.NetlinkFailure as e:
            raise CNIError(E_NETLINK, "setting up the pod's network failed", str(e)) from None
        try:
            loader.load_and_attach(
                eid, link.host_ifname, pin_dir=conf.pin_dir, obj_path=conf.bpf_object
            )
        except BaseException as e:
            netlink.delete_host_veth(inv.container_id)
            if isinstance(e, loader.LoaderError | OSError | ValueError):
                raise CNIError(E_DATAPATH, "attaching the datapath program failed", str(e)) from e
            raise
    except BaseException:
        if created:  # leave nothing behind that the runtime does not know about
            with contextlib.suppress(CNIError):
                _agent(conf, "DELETE", _endpoint_path(inv))
        raise
    return _result(conf, inv, link)


def cmd_del(conf: NetConf, inv: Invocation) -> None:
    from controlplane.datapath import loader

    host = netlink.host_veth_name(inv.container_id)
    try:
        loader.detach(host)
        if not netlink.delete_host_veth(inv.container_id) and inv.netns:
            netlink.delete_pod_interface(inv.netns, inv.ifname)
    except (netlink.NetlinkFailure, loader.LoaderError) as e:
        raise CNIError(E_NETLINK, f"removing {host} failed", str(e)) from None
    except OSError as e:
        if inv.netns and os.path.exists(inv.netns):
            raise CNIError(E_IO, f"removing {host} failed", str(e)) from None
    status, body = _agent(conf, "DELETE", _endpoint_path(inv))
    if status not in (200, 404):
        raise CNIError(
            E_TRY_AGAIN if status == 503 else E_AGENT,
            f"the agent could not delete endpoint {inv.namespace}/{inv.name}",
            f"HTTP {status}: {_agent_error(body)}",
        )


def _prev_ips(prev: Mapping[str, Any] | None) -> set[IPAddress]:
    out: set[IPAddress] = set()
    for entry in (prev or {}).get("ips", []) or []:
        if isinstance(entry, dict) and isinstance(entry.get("address"), str):
            try:
                out.add(ip_address(entry["address"].split("/", 1)[0]))
            except ValueError:
                raise CNIError(E_INVALID_CONFIG, f"prevResult: bad address {entry}") from None
    return out


def cmd_check(conf: NetConf, inv: Invocation) -> None:
    from controlplane.datapath import loader

    if not os.path.exists(inv.netns):
        raise CNIError(E_UNKNOWN_CONTAINER, f"network namespace {inv.netns} does not exist")
    status, endpoint = _agent(conf, "GET", _endpoint_path(inv))
    if status != 200 or not isinstance(endpoint, dict):
        raise CNIError(E_CHECK, f"the agent has no endpoint {inv.namespace}/{inv.name}",
                       f"HTTP {status}: {_agent_error(endpoint)}")  # fmt: skip
    host = netlink.host_veth_name(inv.container_id)
    if not netlink.link_exists(host):
        raise CNIError(E_CHECK, f"host veth {host} does not exist")
    if not loader.is_attached(host):
        raise CNIError(E_CHECK, f"no datapath program attached on {host}")
    pod = netlink.inspect_pod(inv.netns, inv.ifname)
    if not pod.exists:
        raise CNIError(E_CHECK, f"{inv.ifname} does not exist in {inv.netns}")
    if not pod.up:
        raise CNIError(E_CHECK, f"{inv.ifname} in {inv.netns} is down")
    try:
        want = {ip_address(str(endpoint.get("ip")))} | _prev_ips(conf.prev_result)
    except ValueError:
        raise CNIError(E_CHECK, "the agent's endpoint has no IP", json.dumps(endpoint)) from None
    missing = want - pod.addresses
    if missing:
        raise CNIError(
            E_CHECK,
            f"{inv.ifname} in {inv.netns} lacks {', '.join(sorted(map(str, missing)))}",
            f"has {', '.join(sorted(map(str, pod.addresses)))}",
        )
    if pod.default_gateway is None:
        raise CNIError(E_CHECK, f"no default route via {inv.ifname} in {inv.netns}")


def run(env: Mapping[str, str], stdin: str) -> tuple[int, dict[str, Any] | None]:
    """The plugin without process plumbing: (exit status, JSON to print or None)."""
    version = "1.0.0"
    try:
        command = env.get("CNI_COMMAND", "")
        if command == "VERSION":
            asked = "1.0.0"
            if stdin.strip():
                data = _decode(stdin)
                if isinstance(data.get("cniVersion"), str) and data["cniVersion"]:
                    asked = data["cniVersion"]
            return 0, {"cniVersion": asked, "supportedVersions": list(SUPPORTED_VERSIONS)}
        data = _decode(stdin)
        if isinstance(data.get("cniVersion"), str) and data["cniVersion"] in SUPPORTED_VERSIONS:
            version = data["cniVersion"]
        inv = _invocation(env)
        conf = parse_netconf(data)
        if inv.command == "ADD":
            return 0, cmd_add(conf, inv)
        if inv.command == "DEL":
            cmd_del(conf, inv)
        else:
            cmd_check(conf, inv)
        return 0, None
    except CNIError as e:
        return 1, _error(version, e.code, e.msg, e.details)
    except Exception as e:  # never a traceback on stdout: the runtime parses it
        return 1, _error(version, E_INTERNAL, f"internal error: {type(e).__name__}", str(e))


def _error(version: str, code: int, msg: str, details: str) -> dict[str, Any]:
    return {"cniVersion": version, "code": code, "msg": msg, "details": details}


USAGE = """usage: cp-cni (run by the container runtime: CNI_COMMAND=ADD|DEL|CHECK|VERSION and the
CNI_* variables in the environment, the network configuration as JSON on stdin)

The CNI plugin of the control plane (CNI spec 1.0; results also in 0.4.0 form).
Configuration fields besides cniVersion, name and type:
  agentSocket  the agent's local API socket        (default /var/run/cp/agent.sock)
  pinDir       where the datapath maps are pinned  (default /sys/fs/bpf/cp)
  mtu          MTU of both veth ends               (default: the kernel's)
  labels       endpoint labels, e.g. ["k8s:app=web"]
  bpfObject    the datapath object (default: $CP_BPF_OBJECT, else the packaged one)
Any failure prints a CNI error {"cniVersion", "code", "msg", "details"} and exits 1.

  cp-cni install [--bin-dir /opt/cni/bin] [--conf-dir /etc/cni/net.d] [--uninstall]
  cp-cni uninstall [--bin-dir ...] [--conf-dir ...]
install the plugin and its conflist on the node (see cp-cni install --help)."""


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    # CNI passes everything through the environment and stdin; arguments are for people.
    args = sys.argv[1:] if argv is None else list(argv)
    out = sys.stdout if stdout is None else stdout
    if args:
        if args[0] in ("-h", "--help"):
            out.write(USAGE + "\n")
            return 0
        if args[0] in ("install", "uninstall"):
            from controlplane.cni import install

            return install.main(args)
        print(f"cp-cni: takes no arguments (got {args[0]!r}); see cp-cni --help", file=sys.stderr)
        return 2
    payload: dict[str, Any] | None
    try:
        interactive = os.environ.get("CNI_COMMAND") == "VERSION" and sys.stdin.isatty()
        stdin = "" if interactive else sys.stdin.read()
    except (OSError, UnicodeDecodeError) as e:
        rc, payload = 1, _error("1.0.0", E_IO, "cannot read stdin", str(e))
    else:
        rc, payload = run(os.environ, stdin)
    if payload is not None:
        out.write(json.dumps(payload) + "\n")
        out.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main())
