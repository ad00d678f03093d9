"""deploy/etcd: the manifests parse, auth-bootstrap.sh sets up least privilege against a real
etcd (and changes nothing the second time), and the example kvstore config loads."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import backend_for, etcd_tool, requires
from pki import TestPKI

from controlplane.config import TLSConfig, config_from_mapping
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.errors import PermissionDenied

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "etcd"
SCRIPT = DEPLOY / "auth-bootstrap.sh"
SCRIPT_TIMEOUT_S = 120.0

ETCDCTL, _ETCDCTL_UNMET = etcd_tool("etcdctl")
needs_etcdctl = requires(_ETCDCTL_UNMET)


# -- manifests -------------------------------------------------------------------------------


def documents(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{name}: a document is not a mapping"
        assert doc.get("apiVersion"), f"{name}: {doc.get('kind')} without apiVersion"
        assert doc.get("kind"), f"{name}: a document without kind"
        assert isinstance(doc.get("metadata"), dict), f"{name}: {doc['kind']} without metadata"
        assert doc["metadata"].get("name"), f"{name}: {doc['kind']} without metadata.name"
    return docs


def flags(args: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"want --flag=value, got {arg!r}"
        name, _, value = arg[2:].partition("=")
        assert name not in parsed, f"--{name} given twice"
        parsed[name] = value
    return parsed


def test_statefulset_manifest() -> None:
    docs = documents("statefulset.yaml")
    kinds = Counter(d["kind"] for d in docs)
    assert kinds == {"Service": 2, "StatefulSet": 1, "PodDisruptionBudget": 1}
    by_kind = {d["kind"]: d for d in docs if d["kind"] != "Service"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    sts, pdb = by_kind["StatefulSet"], by_kind["PodDisruptionBudget"]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]

    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    headless = services[spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    clients = [s for name, s in services.items() if name != spec["serviceName"]]
    assert len(clients) == 1 and clients[0]["spec"].get("clusterIP") != "None"
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()

    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()

    required = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        term["topologyKey"] == "kubernetes.io/hostname"
        and term["labelSelector"]["matchLabels"].items() <= labels.items()
        for term in required
    )

    (container,) = pod["containers"]
    match = re.fullmatch(r".*/etcd:v(\d+)\.(\d+)\.(\d+)", container["image"])
    assert match, container["image"]
    major, minor, patch = map(int, match.groups())
    assert (major, minor) == (3, 5) and patch >= 6, "want etcd 3.5.x with x >= 6"

    f = flags(container["args"])
    assert f["client-cert-auth"] == "true" and f["peer-client-cert-auth"] == "true"
    assert f["listen-client-urls"].startswith("https://")
    assert f["listen-peer-urls"].startswith("https://")
    assert f["advertise-client-urls"].startswith("https://")
    assert f["listen-metrics-urls"] == "http://0.0.0.0:2381"
    assert f["quota-backend-bytes"] == str(8 * 1024**3)
    assert f["auto-compaction-mode"] in ("periodic", "revision")
    assert f["auto-compaction-retention"]
    members = f["initial-cluster"].split(",")
    assert len(members) == spec["replicas"]
    assert all(m.split("=", 1)[1].startswith("https://") for m in members)
    assert f["name"] == "$(POD_NAME)"
    env = {e["name"] for e in container["env"]}
    assert {"POD_NAME", "POD_NAMESPACE"} <= env

    # TLS files come from the Secret volume; the data dir from the volume claim.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    tls_volume = next(n for n, v in volumes.items() if "secret" in v)
    for flag in (
        "trusted-ca-file",
        "cert-file",
        "key-file",
        "peer-trusted-ca-file",
        "peer-cert-file",
        "peer-key-file",
    ):
        assert f[flag].startswith(mounts[tls_volume] + "/"), flag
    (claim,) = spec["volumeClaimTemplates"]
    assert f["data-dir"].startswith(mounts[claim["metadata"]["name"]] + "/")
    assert claim["spec"]["resources"]["requests"]["storage"]

    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": 2379, "peer": 2380, "metrics": 2381}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in ("metrics", 2381), probe
        assert get["path"] in ("/livez", "/readyz", "/health"), probe
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_bootstrap_job_manifest() -> None:
    (job,) = documents("bootstrap-job.yaml")
    assert job["kind"] == "Job"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ETCDCTL_ENDPOINTS"].startswith("https://")
    for name in ("ETCDCTL_CACERT", "ETCDCTL_CERT", "ETCDCTL_KEY"):
        assert env[name]
    for stem in ("ROOT", "AGENT", "OPERATOR", "READONLY"):
        assert env[f"CP_ETCD_{stem}_PASSWORD_FILE"], stem
        assert f"CP_ETCD_{stem}_PASSWORD" not in env, "passwords belong in files"


# -- auth-bootstrap.sh -----------------------------------------------------------------------


def script_env(endpoints: list[str], **extra: str) -> dict[str, str]:
    """The test's environment without anything that would steer etcdctl or the script."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ETCDCTL_", "CP_ETCD_", "CP_KVSTORE_"))
    }
    env["ETCDCTL_ENDPOINTS"] = ",".join(endpoints)
    if ETCDCTL is not None:  # the script runs the etcdctl on PATH: the one we found
        env["PATH"] = os.pathsep.join([str(ETCDCTL.parent), env.get("PATH", os.defpath)])
    env.update(extra)
    return env


async def run_bootstrap(env: Mapping[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(SCRIPT),
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SCRIPT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def passwords() -> dict[str, str]:
    return {name: secrets.token_urlsafe(18) for name in ("root", "agent", "operator", "readonly")}


def password_env(pw: Mapping[str, str], tmp_path: Path) -> dict[str, str]:
    # The agent's comes from a file (with a trailing newline, as `kubectl create secret
    # --from-file` of an echoed value has), the others from variables.
    agent_file = tmp_path / "agent-password"
    agent_file.write_text(pw["agent"] + "\n")
    return {
        "CP_ETCD_ROOT_PASSWORD": pw["root"],
        "CP_ETCD_AGENT_PASSWORD_FILE": str(agent_file),
        "CP_ETCD_OPERATOR_PASSWORD": pw["operator"],
        "CP_ETCD_READONLY_PASSWORD": pw["readonly"],
    }


async def bootstrap_twice(env: Mapping[str, str], pw: Mapping[str, str]) -> list[str]:
    """Run the script twice; return the second run's lines (which must change nothing)."""
    rc, out, err = await run_bootstrap(env)
    assert rc == 0, f"first run failed:\n{out}\n{err}"
    lines = out.splitlines()
    assert lines[0].startswith("auth: disabled")
    assert "auth: enabled" in lines
    assert "user cp-agent: created" in lines
    assert any(line.startswith("role cp-agent: granted read on key") for line in lines)
    rc, out, err = await run_bootstrap(env)
    assert rc == 0, f"second run failed:\n{out}\n{err}"
    again = out.splitlines()
    assert again[0] == "auth: enabled; authenticated as root"
    assert again[-1] == "done: 0 change(s)", out
    assert not any(word in line for line in again for word in ("created", "granted"))
    assert "WARNING" not in err
    for secret in pw.values():
        assert secret not in out + err, "a password was printed"
    return again


@needs_etcdctl
async def test_auth_bootstrap_least_privilege(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    urls = etcd1.client_urls
    pw = passwords()
    env = script_env(urls, **password_env(pw, tmp_path))

    again = await bootstrap_twice(env, pw)
    assert "role cp-agent: has readwrite on prefix cp/state/" in again
    assert "role cp-agent: has read on key cp/.heartbeat" in again
    assert "role cp-operator: has readwrite on prefix cp/" in again
    assert "role cp-readonly: has read on prefix cp/" in again
    assert "auth: already enabled" in again

    node_key = b"cp/state/nodes/v1/default/node-1"
    async with backend_for(urls, username="cp-operator", password=pw["operator"]) as operator:
        await operator.put(b"cp/.heartbeat", b"beat")
        await operator.put(b"cp/.operator/leader/1", b"op-1")
        await operator.put(b"cp/state/ipam/v1/cidrs/default/10.0.1.0_24", b"node-1")
        with pytest.raises(PermissionDenied):
            await operator.put(b"elsewhere/x", b"1")

    async with backend_for(urls, username="cp-agent", password=pw["agent"]) as agent:
        await agent.put(node_key, b"node")
        await agent.put(b"cp/state/ip/v1/default/10.0.1.5", b"endpoint")
        lease = await agent.grant(60)
        await agent.put(b"cp/state/ipam/v1/leases/node-1/10.0.1.5", b"ep", lease=lease.id)
        await agent.revoke(lease.id)  # needs write access to every key on the lease
        beat = await agent.get(b"cp/.heartbeat")
        assert beat is not None and beat.value == b"beat"
        listed = await agent.list_prefix(b"cp/state/")
        assert node_key in {kv.key for kv in listed.kvs}
        for key in (b"cp/.heartbeat", b"cp/.operator/leader/2", b"elsewhere/x", b"cpx"):
            with pytest.raises(PermissionDenied):
                await agent.put(key, b"1")
        with pytest.raises(PermissionDenied):
            await agent.get(b"cp/.operator/leader/1")  # read only where it needs to

    async with backend_for(urls, username="cp-readonly", password=pw["readonly"]) as readonly:
        kv = await readonly.get(node_key)
        assert kv is not None and kv.value == b"node"
        assert len((await readonly.list_prefix(b"cp/")).kvs) >= 4
        for key in (node_key, b"cp/.heartbeat", b"elsewhere/x"):
            with pytest.raises(PermissionDenied):
                await readonly.put(key, b"1")
        with pytest.raises(PermissionDenied):
            await readonly.get(b"elsewhere/x")

    async with backend_for(urls) as anonymous:
        with pytest.raises(PermissionDenied):
            await anonymous.get(node_key)
        with pytest.raises(PermissionDenied):
            await anonymous.put(b"cp/state/x", b"1")

    with pytest.raises(PermissionDenied):
        async with backend_for(urls, username="cp-agent", password="wrong-" + pw["agent"]):
            pass

    # Later runs need root's password, and say so when it is wrong.
    rc, out, err = await run_bootstrap({**env, "CP_ETCD_ROOT_PASSWORD": "wrong"})
    assert rc == 1 and "root cannot log in" in err, out + err


@needs_etcdctl
async def test_auth_bootstrap_over_tls_with_a_custom_prefix(
    etcd_tls: EmbeddedEtcd, pki: TestPKI, tmp_path: Path
) -> None:
    # The fixture's client certificate has CN=root: with auth on, etcd would take a request
    # without a token for root's. The script must still see that auth is on.
    pw = passwords()
    env = script_env(
        etcd_tls.client_urls,
        ETCDCTL_CACERT=str(pki.ca_file),
        ETCDCTL_CERT=str(pki.client_cert),
        ETCDCTL_KEY=str(pki.client_key),
        CP_KVSTORE_PREFIX="tenant-a",  # the trailing slash is added
        **password_env(pw, tmp_path),
    )
    again = await bootstrap_twice(env, pw)
    assert "role cp-agent: has readwrite on prefix tenant-a/state/" in again
    assert "role cp-agent: has read on key tenant-a/.heartbeat" in again

    tls = TLSConfig(ca_file=pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key)
    urls = etcd_tls.client_urls
    async with backend_for(urls, tls=tls, username="cp-agent", password=pw["agent"]) as agent:
        await agent.put(b"tenant-a/state/nodes/v1/default/n1", b"node")
        for key in (b"tenant-a/.heartbeat", b"cp/state/nodes/v1/default/n1"):
            with pytest.raises(PermissionDenied):
                await agent.put(key, b"1")


@needs_etcdctl
async def test_auth_bootstrap_stops_before_enabling_auth_without_a_password(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    pw = passwords()
    env = password_env(pw, tmp_path)
    del env["CP_ETCD_OPERATOR_PASSWORD"]
    rc, out, err = await run_bootstrap(script_env(etcd1.client_urls, **env))
    assert rc == 1
    assert "CP_ETCD_OPERATOR_PASSWORD" in err
    assert "auth: enabled" not in out.splitlines()
    async with backend_for(etcd1.client_urls) as anonymous:
        await anonymous.put(b"cp/state/still-open", b"1")  # auth is still off

    rc, _, err = await run_bootstrap(
        script_env(etcd1.client_urls, **{**env, "CP_ETCD_OPERATOR_PASSWORD": "has space"})
    )
    assert rc == 1 and "whitespace" in err


# -- the example kvstore config --------------------------------------------------------------

_FILE_KEYS = ("trusted-ca-file", "cert-file", "key-file", "password-file")
_UNCOMMENT = re.compile(r"^(\s*)# ")


def redirect_files(data: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Point every file the config names at a temporary file of the same name."""
    for index, cluster in enumerate(data["clusters"]):
        for key in _FILE_KEYS:
            if key in cluster:
                original = Path(cluster[key])
                local = tmp_path / f"cluster{index}" / original.name
                local.parent.mkdir(exist_ok=True)
                local.write_text("s3cret\n" if key == "password-file" else "PEM\n")
                cluster[key] = str(local)
    return data


def test_example_kvstore_config_loads(tmp_path: Path) -> None:
    text = (DEPLOY / "kvstore-config.yaml").read_text()
    data = yaml.safe_load(text)
    files = {key: Path(data["clusters"][0][key]) for key in _FILE_KEYS}
    assert all(path.is_absolute() for path in files.values())

    config = config_from_mapping(redirect_files(data, tmp_path), base=tmp_path)
    (main,) = config.clusters
    assert config.prefix == "cp/"
    assert len(main.endpoints) == 3 and all(e.startswith("https://") for e in main.endpoints)
    assert main.tls is not None and main.tls.ca_file is not None
    assert main.tls.cert_file is not None and main.tls.key_file is not None
    assert main.tls.server_name
    assert main.username == "cp-agent" and main.password == "s3cret"
    assert config.clusters_for("identities") == ("main",)

    # The commented-out second cluster and shards: are valid once uncommented.
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if "uncomment" in line) + 1
    uncommented = lines[:start] + [_UNCOMMENT.sub(r"\1", line) for line in lines[start:]]
    sharded = yaml.safe_load("\n".join(uncommented))
    config = config_from_mapping(redirect_files(sharded, tmp_path), base=tmp_path)
    assert [c.name for c in config.clusters] == ["main", "ids-b"]
    assert config.clusters_for("identities") == ("main", "ids-b")
    assert config.clusters_for("endpoints") == ("main",)
    assert all(c.tls is not None and c.username == "cp-agent" for c in config.clusters)
