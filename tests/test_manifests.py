"""The Kubernetes manifests as a user installs them: agent/, operator/ (the CRD-mode bases),
deploy/crd (the default) and deploy/kvstore (the kvstore-mode overlay), relay/, deploy/etcd.

- Every kustomization renders offline with the kubectl on PATH (1.32, its built-in
  kustomize; a proxy that refuses every connection proves nothing is fetched).
- What the local API server serves (CRDs) is applied to it with kubectl: the five
  controlplane.io CRDs become Established, their resources are listed, and the resources
  and verbs the RBAC grants are ones the server serves.
- What it does not serve (workloads, RBAC, PDBs, Jobs) is checked against the Kubernetes
  schemas of the `kubernetes` client's models (every field known, types and required
  fields), and by YAML checks: every flag a container passes exists in the daemon's
  `--help`, choices are valid, `$(VAR)`s are defined, volumes exist, the kvstore overlay
  mounts what deploy/etcd creates at the paths its config files name, one image (the one
  `make image` builds).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client.models as k8s_models
import pytest
import yaml
from kubernetes.client import ApiClient

pytest.register_assert_rewrite("tests.kube_fixtures")
from controlplane.apiserver import KubeServer  # noqa: E402
from controlplane.config import config_from_mapping  # noqa: E402
from tests.helpers import requires, tools_unmet  # noqa: E402
from tests.kube_fixtures import eventually, kubectl  # noqa: E402

pytest_plugins = ["tests.kube_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
DEFINITIONS = ROOT / "controlplane" / "crd" / "definitions"
ETCD = ROOT / "deploy" / "etcd"
BIN = Path(sys.executable).parent
KUSTOMIZATIONS = ("agent", "operator", "deploy/crd", "deploy/kvstore", "relay")
# Every file of Kubernetes objects that is applied as it is (the overlays render the rest).
PLAIN_MANIFESTS = (
    "agent/rbac.yaml",
    "agent/daemonset.yaml",
    "operator/rbac.yaml",
    "operator/deployment.yaml",
    "deploy/etcd/statefulset.yaml",
    "deploy/etcd/bootstrap-job.yaml",
    "relay/deployment.yaml",  # (its flags: tests/test_relay.py)
)
# The kustomize name of the image in the bases; deploy/crd's `images:` sets it.
IMAGE_PLACEHOLDER = "controlplane"
OUR_COMMANDS = ("cp-agent", "cp-operator", "cp-cni")
# Flags being added on other branches, allowed here while a daemon's --help lacks them
# (cp-operator's --store/--kubeconfig/--kube-context; cp-agent has them on main). Drop an
# entry once the daemon has the flag: it is then checked against --help like the rest.
PENDING_FLAGS: dict[str, frozenset[str]] = {}
PENDING_CHOICES: dict[str, dict[str, frozenset[str]]] = {}
needs_kubectl = requires(tools_unmet("kubectl"))


# -- rendering -------------------------------------------------------------------------------


def documents(text: str, origin: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{origin}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{origin}: {doc!r:.80}"
        assert doc.get("metadata", {}).get("name"), f"{origin}: a {doc['kind']} without name"
    return docs


@functools.cache
def render(directory: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize DIR`, offline: any network access goes to a refusing proxy."""
    refuse = "http://127.0.0.1:9"
    env = {**os.environ, "HTTPS_PROXY": refuse, "HTTP_PROXY": refuse, "NO_PROXY": ""}
    done = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / directory)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, f"kubectl kustomize {directory}: {done.stderr}"
    return tuple(documents(done.stdout, f"kubectl kustomize {directory}"))


def plain(name: str) -> list[dict[str, Any]]:
    return documents((ROOT / name).read_text(), name)


def find(docs: typing.Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name}"
    return found[0]


def kinds(docs: typing.Iterable[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def workloads(docs: typing.Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet", "Job")]


def crd_definitions() -> list[dict[str, Any]]:
    docs = [doc for path in sorted(DEFINITIONS.glob("*.yaml")) for doc in plain(str(path))]
    assert len(docs) == 5
    return docs


def test_every_kustomization_in_the_tree_is_tested() -> None:
    found = {
        str(p.parent.relative_to(ROOT))
        for p in ROOT.rglob("kustomization.yaml")
        if not {".venv", ".git", "node_modules"} & set(p.relative_to(ROOT).parts)
    }
    assert found == set(KUSTOMIZATIONS)


@needs_kubectl
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomization_renders_offline(directory: str) -> None:
    docs = render(directory)
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"{directory}: an object twice"
    assert workloads(docs), f"{directory}: renders no workload"


@needs_kubectl
def test_the_overlays_are_the_bases() -> None:
    agent, operator = render("agent"), render("operator")
    assert kinds(render("deploy/crd")) == kinds(agent) | kinds(operator)
    rbac = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    kept = {k for k in kinds(render("deploy/crd")) if k[0] not in rbac}
    assert kinds(render("deploy/kvstore")) == kept, "kvstore mode: everything but the roles"


# -- schemas ---------------------------------------------------------------------------------


def _check_fields(value: Any, type_name: str, path: str, errors: list[str]) -> None:
    """Every field is one the schema has, recursively (the models ignore unknown ones)."""
    if type_name.startswith(("List[", "list[")):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return
        for index, item in enumerate(value):
            _check_fields(item, type_name[5:-1], f"{path}[{index}]", errors)
    elif type_name.startswith(("Dict[", "dict(")):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping")
            return
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        for key, item in value.items():
            _check_fields(item, inner, f"{path}.{key}", errors)
    elif type_name == "str":
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
    elif type_name == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(f"{path}: expected an integer, got {value!r}")
    elif type_name == "bool":
        if not isinstance(value, bool):
            errors.append(f"{path}: expected a boolean, got {value!r}")
    elif hasattr(k8s_models, type_name):
        model = getattr(k8s_models, type_name)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a {type_name} mapping")
            return
        fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
        for key, item in value.items():
            if key not in fields:
                errors.append(f"{path}.{key}: no such field in {type_name}")
            else:
                _check_fields(item, model.openapi_types[fields[key]], f"{path}.{key}", errors)
    # anything else ('object': int-or-string, JSON values; datetime; float) is free-form


@functools.cache
def _api_client() -> Any:
    return ApiClient()


def schema_errors(doc: dict[str, Any]) -> list[str]:
    group_version = doc["apiVersion"].split("/")[-1]
    model_name = group_version[:1].upper() + group_version[1:] + doc["kind"]
    assert hasattr(k8s_models, model_name), f"no schema for {doc['apiVersion']} {doc['kind']}"
    errors: list[str] = []
    _check_fields(doc, model_name, doc["kind"], errors)
    try:  # required fields and value types, as the client's models define them
        _api_client()._ApiClient__deserialize(doc, model_name)
    except Exception as error:  # pydantic's ValidationError, or older models' ValueError
        errors.append(f"{doc['kind']}: {error}")
    return errors


def all_sources() -> list[tuple[str, list[dict[str, Any]]]]:
    sources = [(name, plain(name)) for name in PLAIN_MANIFESTS]
    sources.append(("controlplane/crd/definitions", crd_definitions()))
    return sources


def test_every_plain_manifest_matches_the_kubernetes_schema() -> None:
    errors = [
        f"{name}: {e}" for name, docs in all_sources() for doc in docs for e in schema_errors(doc)
    ]
    assert not errors, "\n".join(errors)


@needs_kubectl
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_rendered_object_matches_the_kubernetes_schema(directory: str) -> None:
    errors = [f"{directory}: {e}" for doc in render(directory) for e in schema_errors(doc)]
    assert not errors, "\n".join(errors)


def test_the_schema_check_finds_mistakes() -> None:
    (daemonset,) = (d for d in plain("agent/daemonset.yaml") if d["kind"] == "DaemonSet")
    assert schema_errors(daemonset) == []
    typo = json.loads(json.dumps(daemonset))
    pod_spec(typo)["containers"][0]["volumeMounts"][0]["mountPropogation"] = "Bidirectional"
    assert any("mountPropogation: no such field" in e for e in schema_errors(typo))
    wrong_type = json.loads(json.dumps(daemonset))
    pod_spec(wrong_type)["hostNetwork"] = "yes"
    assert any("hostNetwork" in e for e in schema_errors(wrong_type))
    missing = json.loads(json.dumps(daemonset))
    del pod_spec(missing)["containers"]
    assert any("containers" in e for e in schema_errors(missing))


# -- the local API server: the kinds it serves -----------------------------------------------


@needs_kubectl
async def test_crds_apply_to_the_api_server_and_serve_what_the_rbac_grants(
    kube: KubeServer,
) -> None:
    """CRDs are the one kind of ours the local server serves: apply them with kubectl,
    wait for Established, list their objects, and check the RBAC against its discovery."""
    kc = kube.kubeconfig

    async def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(kubectl, kc, *args, check=check)

    names = sorted(doc["metadata"]["name"] for doc in crd_definitions())
    applied = (await run("apply", "-f", str(DEFINITIONS))).stdout
    assert applied.count(" created") == 5, applied

    async def established() -> list[str]:
        listing = json.loads((await run("get", "crds", "-o", "json")).stdout)
        ready = sorted(
            item["metadata"]["name"]
            for item in listing["items"]
            if any(
                c["type"] == "Established" and c["status"] == "True"
                for c in item.get("status", {}).get("conditions", [])
            )
        )
        return ready if ready == names else []

    await eventually(established, timeout=20.0, message="the five CRDs Established")
    table = (await run("get", "crds")).stdout
    assert all(name in table for name in names), table

    listed = await run("get", "identities,endpoints.controlplane.io", "-A")
    assert "No resources found" in listed.stdout + listed.stderr
    again = (await run("apply", "-f", str(DEFINITIONS))).stdout
    assert again.count(" unchanged") == 5, again  # kubectl apply is idempotent on them

    # Every controlplane.io resource and verb the RBAC grants is one the server serves.
    discovery = json.loads((await run("get", "--raw", "/apis/controlplane.io/v1")).stdout)
    served = {r["name"]: set(r["verbs"]) for r in discovery["resources"]}
    for directory in ("agent", "operator"):
        for role in (d for d in render(directory) if d["kind"] in ("ClusterRole", "Role")):
            for rule in role["rules"]:
                if rule["apiGroups"] != ["controlplane.io"]:
                    continue
                for resource in rule["resources"]:
                    assert resource in served, f"{role['metadata']['name']}: {resource}"
                    extra = set(rule["verbs"]) - served[resource]
                    assert not extra, f"{role['metadata']['name']}: {resource} {extra}"


# -- RBAC ------------------------------------------------------------------------------------

Grant = tuple[str, str, tuple[str, ...], str]  # group, resource, resourceNames, verb


def grants(role: dict[str, Any]) -> set[Grant]:
    out: set[Grant] = set()
    for rule in role["rules"]:
        names = tuple(sorted(rule.get("resourceNames", ())))
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, names, verb))
    return out


def expand(table: dict[tuple[str, str, tuple[str, ...]], str]) -> set[Grant]:
    return {(g, r, n, verb) for (g, r, n), verbs in table.items() for verb in verbs.split()}


CP = "controlplane.io"
CRD_NAMES = tuple(
    sorted(
        f"{plural}.controlplane.io"
        for plural in ("identities", "endpoints", "nodes", "podcidrs", "networkpolicies")
    )
)
AGENT_GRANTS = expand(
    {
        (CP, "identities", ()): "get list watch create update patch delete",
        (CP, "endpoints", ()): "get list watch create update delete",
        (CP, "nodes", ()): "get list watch create update patch delete",
        (CP, "nodes/status", ()): "update patch",
        (CP, "podcidrs", ()): "get list watch",
        (CP, "networkpolicies", ()): "get list watch",
        ("", "services", ()): "get list watch",
        ("discovery.k8s.io", "endpointslices", ()): "get list watch",
    }
)
OPERATOR_GRANTS = expand(
    {
        ("apiextensions.k8s.io", "customresourcedefinitions", ()): "list watch create",
        ("apiextensions.k8s.io", "customresourcedefinitions", CRD_NAMES): "get update",
        (CP, "identities", ()): "get list watch update patch delete",
        (CP, "endpoints", ()): "get list watch delete",
        (CP, "nodes", ()): "get list watch update patch",
        (CP, "podcidrs", ()): "get list watch create delete",
    }
)
ELECTION_GRANTS = expand(
    {
        ("coordination.k8s.io", "leases", ()): "create",
        ("coordination.k8s.io", "leases", ("cp-operator",)): "get update",
    }
)


@needs_kubectl
def test_rbac_is_exactly_what_crd_mode_needs() -> None:
    agent, operator = render("agent"), render("operator")
    assert grants(find(agent, "ClusterRole", "cp-agent")) == AGENT_GRANTS
    assert grants(find(operator, "ClusterRole", "cp-operator")) == OPERATOR_GRANTS
    election = find(operator, "Role", "cp-operator-election")
    assert election["metadata"]["namespace"] == "kube-system"  # where the Lease lives
    assert grants(election) == ELECTION_GRANTS
    # The names are the CRDs' own; the stale ones are gone.
    definitions = crd_definitions()
    assert sorted(d["metadata"]["name"] for d in definitions) == sorted(CRD_NAMES)
    plurals = {d["spec"]["names"]["plural"] for d in definitions}
    with_status = {
        d["spec"]["names"]["plural"] + "/status"
        for d in definitions
        if any("status" in v.get("subresources", {}) for v in d["spec"]["versions"])
    }
    assert with_status == {"nodes/status"}
    for grant in AGENT_GRANTS | OPERATOR_GRANTS:
        if grant[0] == CP:
            assert grant[1] in plurals | with_status, grant
    for path in ("agent/rbac.yaml", "operator/rbac.yaml"):
        text = (ROOT / path).read_text()
        for stale in ("identityindices", "identityindexes", "nodestates"):
            assert stale not in text, f"{path}: {stale}"


@needs_kubectl
@pytest.mark.parametrize("directory", ("deploy/crd", "deploy/kvstore"))
def test_bindings_and_service_accounts_fit_together(directory: str) -> None:
    docs = render(directory)
    accounts = {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for d in docs
        if d["kind"] == "ServiceAccount"
    }
    for binding in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        ref = binding["roleRef"]
        find(docs, ref["kind"], ref["name"])
        for subject in binding["subjects"]:
            assert (subject["namespace"], subject["name"]) in accounts, binding
    for workload in workloads(docs):
        namespace = workload["metadata"]["namespace"]
        assert (namespace, pod_spec(workload)["serviceAccountName"]) in accounts
    if directory == "deploy/kvstore":  # no API access in kvstore mode
        assert not [d for d in docs if d["kind"].endswith(("Role", "RoleBinding"))]
        assert all(pod_spec(w)["automountServiceAccountToken"] is False for w in workloads(docs))


# -- containers: flags, images, volumes ------------------------------------------------------


@functools.cache
def daemon_help(command: tuple[str, ...]) -> str:
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:], "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{' '.join(command)} --help: {done.stderr}"
    return done.stdout


def help_flags(command: tuple[str, ...]) -> tuple[set[str], dict[str, set[str]]]:
    """The flags of ``command --help`` and, for those with a choice, the choices."""
    text = daemon_help(command)
    flags = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", text))
    choices = {
        flag: set(values.split(","))
        for flag, values in re.findall(r"(--[a-z0-9-]+) \{([a-z0-9,-]+)\}", text)
    }
    return flags, choices


def our_command(container: dict[str, Any]) -> tuple[str, ...]:
    command = tuple(container["command"])
    assert command[0] in OUR_COMMANDS, command
    return command[:2] if command[0] == "cp-cni" else command[:1]


def check_flags(command: tuple[str, ...], args: list[str], where: str) -> list[str]:
    flags, choices = help_flags(command)
    flags |= PENDING_FLAGS.get(command[0], frozenset())
    for flag, values in PENDING_CHOICES.get(command[0], {}).items():
        choices.setdefault(flag, set(values))
    errors = []
    for arg in args:
        if not arg.startswith("--"):
            errors.append(f"{where}: {arg!r} is not a --flag")
            continue
        flag, _, value = arg.partition("=")
        if flag not in flags:
            errors.append(f"{where}: {' '.join(command)} has no {flag}")
        elif flag in choices and value not in choices[flag]:
            errors.append(f"{where}: {flag}={value} is not one of {sorted(choices[flag])}")
    return errors


@needs_kubectl
@pytest.mark.parametrize("directory", ("deploy/crd", "deploy/kvstore"))
def test_every_flag_a_container_passes_exists(directory: str) -> None:
    errors: list[str] = []
    checked = 0
    for workload in workloads(render(directory)):
        for container in containers(workload):
            where = f"{directory} {workload['kind']}/{workload['metadata']['name']}"
            where += f" {container['name']}"
            command = our_command(container)
            errors += check_flags(command, container.get("args", []), where)
            env = {e["name"] for e in container.get("env", [])}
            for arg in container.get("args", []):
                errors += [f"{where}: $({v}) undefined" for v in re.findall(r"\$\((\w+)\)", arg)
                           if v not in env]  # fmt: skip
            checked += len(container.get("args", []))
            stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
            for line in stop.get("command", [])[2:]:  # sh -c "..."
                for call in re.findall(r"cp-cni (uninstall|install)((?: --[\w-]+=\S+)*)", line):
                    errors += check_flags(("cp-cni", call[0]), call[1].split(), f"{where} preStop")
                    checked += 1
    assert checked > 10 and not errors, "\n".join(errors)


def test_the_flag_check_finds_mistakes() -> None:
    assert check_flags(("cp-agent",), ["--node-name=x", "--store=crd"], "t") == []
    assert check_flags(("cp-agent",), ["--kvstore-cofnig=/x"], "t") != []
    assert check_flags(("cp-agent",), ["--store=etcd"], "t") != []
    assert check_flags(("cp-cni", "install"), ["--bin-dir=/x", "--bogus=1"], "t") != []


@needs_kubectl
def test_crd_mode_is_the_default_and_needs_no_kvstore() -> None:
    docs = render("deploy/crd")
    for workload in workloads(docs):
        spec = pod_spec(workload)
        main = spec["containers"][0]
        assert main["args"][0] == "--store=crd"
        assert not [a for a in main["args"] if a.startswith("--kvstore")]
        text = json.dumps(workload)
        assert "kvstore" not in text and "cp-etcd" not in text, workload["metadata"]["name"]
        assert spec.get("automountServiceAccountToken", True), "CRD mode needs the token"


def mounted_files(
    workload: dict[str, Any], container: dict[str, Any]
) -> dict[str, tuple[str, str]]:
    """Path in the container -> (ConfigMap/Secret name, key) for every projected item."""
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    out: dict[str, tuple[str, str]] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        sources = volume.get("projected", {}).get("sources", [volume])
        for source in sources:
            for kind in ("configMap", "secret"):
                if kind in source:
                    ref = source[kind]
                    name = ref.get("name") or ref.get("secretName")
                    for item in ref.get("items", []):
                        out[f"{mount['mountPath']}/{item['path']}"] = (name, item["key"])
                    if not ref.get("items"):
                        out[f"{mount['mountPath']}/*"] = (name, "*")
    return out


@needs_kubectl
def test_kvstore_overlay_mounts_what_deploy_etcd_creates(tmp_path: Path) -> None:
    readme = (ETCD / "README.md").read_text()
    docs = render("deploy/kvstore")
    configs = {"cp-agent": "kvstore-config.yaml", "cp-operator": "operator-kvstore-config.yaml"}
    for workload in workloads(docs):
        main = pod_spec(workload)["containers"][0]
        user = main["command"][0]
        assert main["args"][0] == "--store=kvstore"
        (config_arg,) = [a for a in main["args"] if a.startswith("--kvstore-config=")]
        config_path = config_arg.partition("=")[2]
        files = mounted_files(workload, main)
        directory, _, key = config_path.rpartition("/")
        configmap, _ = files[f"{directory}/*"]
        # The ConfigMap the overlay mounts is the one the docs create, from that file.
        create = f"create configmap {configmap} --from-file={key}=deploy/etcd/{configs[user]}"
        assert create in readme, f"deploy/etcd/README.md does not show: {create}"
        header = (ETCD / configs[user]).read_text()
        assert re.search(rf"configmap {configmap}\b", header), configs[user]
        # Every file the config names is mounted there, from the Secrets the README creates.
        data = yaml.safe_load((ETCD / configs[user]).read_text())
        (cluster,) = data["clusters"]
        assert cluster["username"] == user
        expected = {
            "trusted-ca-file": ("cp-etcd-client-tls", "ca.crt"),
            "cert-file": ("cp-etcd-client-tls", "tls.crt"),
            "key-file": ("cp-etcd-client-tls", "tls.key"),
            "password-file": ("cp-etcd-passwords", user),
        }
        for field, source in expected.items():
            assert files.get(cluster[field]) == source, f"{user}: {field} {cluster[field]}"
            assert f"create secret generic {source[0]}" in readme
        # And the config loads (files redirected to temporary ones).
        for field in expected:
            local = tmp_path / user / Path(cluster[field]).name
            local.parent.mkdir(exist_ok=True)
            local.write_text("secret\n")
            cluster[field] = str(local)
        config = config_from_mapping(data, base=tmp_path)
        assert config.clusters[0].username == user
    # The old, mismatched names are gone everywhere.
    stale = re.compile(r"cp-kvstore(?!-config)\b|cp-operator-kvstore(?!-config)\b")
    for path in (ROOT / "agent", ROOT / "operator", ROOT / "deploy", ROOT / "docs"):
        for file in path.rglob("*"):
            if file.is_file() and file.suffix in (".yaml", ".md"):
                assert not stale.search(file.read_text()), f"{file}: a stale ConfigMap name"


@needs_kubectl
def test_one_image_setting() -> None:
    kustomization = yaml.safe_load((ROOT / "deploy/crd/kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert image["name"] == IMAGE_PLACEHOLDER
    wanted = f"{image['newName']}:{image['newTag']}"
    # what `make image` builds by default (scripts/build-image; tests/test_image.py runs it)
    built = subprocess.run(
        [str(ROOT / "scripts/build-image"), "--name"], capture_output=True, text=True, check=True
    )
    assert built.stdout.strip() == wanted
    assert "images" not in yaml.safe_load((ROOT / "deploy/kvstore/kustomization.yaml").read_text())
    relay = yaml.safe_load((ROOT / "relay/kustomization.yaml").read_text())
    assert relay["images"] == kustomization["images"], "relay/: the same image entry"
    for directory in ("deploy/crd", "deploy/kvstore", "relay"):
        for workload in workloads(render(directory)):
            for container in containers(workload):
                assert container["image"] == wanted, (directory, container["name"])
    for name in (*PLAIN_MANIFESTS[:4], "relay/deployment.yaml"):
        for doc in workloads(plain(name)):
            assert {c["image"] for c in containers(doc)} == {IMAGE_PLACEHOLDER}, name
    install = (ROOT / "docs/install.md").read_text()
    assert "images:" in install and f"name: {IMAGE_PLACEHOLDER}" in install
    for directory in ("deploy/crd", "deploy/kvstore", "relay"):
        assert f"kubectl apply -k {directory}" in install


@needs_kubectl
@pytest.mark.parametrize("mode", ("deploy/crd", "deploy/kvstore"))
def test_the_documented_overlay_of_ones_own_sets_the_image(mode: str, tmp_path: Path) -> None:
    """The overlay docs/install.md tells a user to write (a mode and the relay) sets every
    image."""
    install = (ROOT / "docs/install.md").read_text()
    blocks = re.findall(r"```yaml\n(# my-cluster/kustomization.yaml\n.*?)```", install, re.S)
    assert len(blocks) == 1, "docs/install.md: the my-cluster/kustomization.yaml example"
    mine = yaml.safe_load(blocks[0])
    resource, relay = mine["resources"]
    assert resource.endswith("/deploy/crd") and relay.endswith("/relay")
    mine["resources"] = [os.path.relpath(ROOT / d, tmp_path) for d in (mode, "relay")]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(mine))
    done = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    (image,) = mine["images"]
    rendered = documents(done.stdout, "my-cluster")
    images = {c["image"] for w in workloads(rendered) for c in containers(w)}
    assert images == {f"{image['newName']}:{image['newTag']}"}
    assert ("Deployment", "cp-relay") in kinds(rendered)


@needs_kubectl
@pytest.mark.parametrize("directory", ["agent", "deploy/crd", "deploy/kvstore"])
def test_the_agent_can_run_the_cni_plugin_for_the_node(directory: str) -> None:
    """The node's cp-cni hands each call to the agent, which runs the plugin: every
    rendering gives the agent the host's socket directory (the conflist's agentSocket),
    the pods' network namespaces as the runtime adds them, and the host's PIDs."""
    agent = find(render(directory), "DaemonSet", "cp-agent")
    spec = pod_spec(agent)
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    (init,) = spec["initContainers"]
    socket = dict(a.split("=", 1) for a in init["args"])["--agent-socket"]
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert socket.startswith(host_paths["run"] + "/")
    assert mounts["run"]["mountPath"] == host_paths["run"]
    assert mounts["netns"]["mountPath"] == host_paths["netns"] == "/var/run/netns"
    assert mounts["netns"]["mountPropagation"] == "HostToContainer"
