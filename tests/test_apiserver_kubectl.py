"""kubectl, a client written by others, against `cpctl kube up` (a real subprocess).

The server runs as `cpctl kube up --json` on an embedded etcd; kubectl 1.32 (on PATH) and
1.28 (from the Cloud SDK) use the kubeconfig it writes, with their default validation.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

pytest.register_assert_rewrite("tests.kube_fixtures")
from tests.helpers import missing_tool, requires, tools_unmet  # noqa: E402
from tests.kube_fixtures import KUBECTL_OTHER, WIDGET_CRD, kubectl, kubectl_flags  # noqa: E402

pytestmark = requires(tools_unmet("kubectl"))


def _start(data_dir: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.cli.main",
            "kube",
            "up",
            "--json",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the server prints one JSON line once it serves
    if not line:
        proc.wait(10)
        raise AssertionError(f"cpctl kube up failed: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("kube")
    proc, info = _start(data_dir)
    try:
        crd = data_dir / "crd.yaml"
        crd.write_text(yaml.safe_dump(WIDGET_CRD))
        kubeconfig = Path(info["kubeconfig"])
        kubectl(kubeconfig, "apply", "-f", str(crd))
        kubectl(
            kubeconfig,
            "wait",
            "--for=condition=Established",
            "--timeout=10s",
            "crd/widgets.example.com",
        )
        yield info
    finally:
        _stop(proc)


def _manifest(
    tmp: Path, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
) -> Path:
    path = tmp / f"{name}.yaml"
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": metadata, "spec": spec}
        )
    )
    return path


def test_kubectl_apply_get_patch_label_delete(server: dict[str, Any], tmp_path: Path) -> None:
    kc = Path(server["kubeconfig"])
    assert "widgets.example.com" in kubectl(kc, "get", "crds").stdout

    first = _manifest(tmp_path, "w1", {"size": 3, "color": "red"}, {"app": "demo"})
    assert "widget.example.com/w1 created" in kubectl(kc, "apply", "-f", str(first)).stdout
    table = kubectl(kc, "get", "widgets").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "COLOR"]  # the CRD defines no Age column
    assert table[1].split()[:3] == ["w1", "3", "red"]

    # A second apply without color and with a new size: the three-way merge drops color.
    second = _manifest(tmp_path, "w1", {"size": 5}, {"app": "demo"})
    assert "configured" in kubectl(kc, "apply", "-f", str(second)).stdout
    obj = yaml.safe_load(kubectl(kc, "get", "wd", "w1", "-o", "yaml").stdout)
    assert obj["spec"] == {"size": 5, "shape": "round"}
    assert obj["metadata"]["generation"] == 2
    assert "kubectl.kubernetes.io/last-applied-configuration" in obj["metadata"]["annotations"]

    kubectl(kc, "patch", "wd", "w1", "--type", "merge", "-p", '{"spec":{"color":"blue"}}')
    kubectl(kc, "label", "wd", "w1", "tier=gold")
    kubectl(kc, "scale", "wd", "w1", "--replicas=7")  # the scale subresource
    assert kubectl(kc, "get", "wd", "w1", "-o", "jsonpath={.spec.size}").stdout == "7"
    selected = kubectl(kc, "get", "wd", "-l", "tier=gold", "-o", "name").stdout.split()
    assert selected == ["widget.example.com/w1"]
    spec = json.loads(kubectl(kc, "get", "wd", "w1", "-o", "jsonpath={.spec}").stdout)
    assert spec["color"] == "blue"

    invalid = _manifest(tmp_path, "bad", {"size": 0, "color": "pink"})
    refused = kubectl(kc, "apply", "-f", str(invalid), check=False)
    assert refused.returncode != 0
    assert "spec.size" in refused.stderr and 'Unsupported value: "pink"' in refused.stderr
    unknown = _manifest(tmp_path, "unk", {"size": 2, "bogus": True})
    strict = kubectl(kc, "apply", "-f", str(unknown), check=False)
    assert strict.returncode != 0 and 'unknown field "spec.bogus"' in strict.stderr

    ssa = _manifest(tmp_path, "ssa", {"size": 4, "color": "red"})
    assert "serverside-applied" in kubectl(kc, "apply", "--server-side", "-f", str(ssa)).stdout
    kubectl(kc, "patch", "wd", "ssa", "--type", "merge", "-p", '{"spec":{"size":6}}')
    changed = _manifest(tmp_path, "ssa", {"size": 8})
    conflict = kubectl(kc, "apply", "--server-side", "-f", str(changed), check=False)
    assert conflict.returncode != 0
    assert 'conflict with "kubectl-patch"' in conflict.stderr and ".spec.size" in conflict.stderr
    kubectl(kc, "apply", "--server-side", "--force-conflicts", "-f", str(changed))
    spec = json.loads(kubectl(kc, "get", "wd", "ssa", "-o", "jsonpath={.spec}").stdout)
    assert spec == {"size": 8, "shape": "round"}  # color: no longer applied, so removed

    described = kubectl(kc, "describe", "wd", "w1").stdout
    assert "Events:" in described and "Color:" in described and "blue" in described
    explained = kubectl(kc, "explain", "widgets.spec").stdout
    assert "What the widget should be." in explained and "size" in explained

    # kubectl's typed commands send protobuf.
    kubectl(kc, "create", "namespace", "typed")
    labels = kubectl(kc, "get", "ns", "typed", "-o", "jsonpath={.metadata.labels}").stdout
    assert json.loads(labels) == {"kubernetes.io/metadata.name": "typed"}
    kubectl(kc, "delete", "namespace", "typed")

    kubectl(kc, "delete", "wd", "w1", "ssa")
    assert kubectl(kc, "get", "wd", "-o", "name").stdout.strip() == ""


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for_line(lines: queue.Queue[str], needle: str, timeout: float = 15.0) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            break
        if needle in seen[-1]:
            return seen
    raise AssertionError(f"{needle!r} not seen within {timeout}s; got {seen}")


def test_kubectl_watch_sees_another_clients_change(server: dict[str, Any], tmp_path: Path) -> None:
    kc = Path(server["kubeconfig"])
    kubectl(kc, "apply", "-f", str(_manifest(tmp_path, "watched", {"size": 1})))
    watch = subprocess.Popen(
        ["kubectl", *kubectl_flags(kc), "get", "wd", "-w", "--output-watch-events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = _lines(watch)
        _wait_for_line(lines, "watched")  # the initial state
        kubectl(kc, "patch", "wd", "watched", "--type", "merge", "-p", '{"spec":{"size":42}}')
        seen = _wait_for_line(lines, "42")
        assert "MODIFIED" in seen[-1] and "watched" in seen[-1]
    finally:
        watch.terminate()
        watch.wait(10)
    kubectl(kc, "delete", "wd", "watched")


@requires(None if Path(KUBECTL_OTHER).exists() else missing_tool(f"no {KUBECTL_OTHER}"))
def test_kubectl_128(server: dict[str, Any], tmp_path: Path) -> None:
    kc = Path(server["kubeconfig"])
    old = Path(KUBECTL_OTHER)
    manifest = _manifest(tmp_path, "old", {"size": 2, "color": "green"})
    assert "created" in kubectl(kc, "apply", "-f", str(manifest), binary=str(old)).stdout
    again = _manifest(tmp_path, "old", {"size": 6})
    assert "configured" in kubectl(kc, "apply", "-f", str(again), binary=str(old)).stdout
    table = kubectl(kc, "get", "wd", "old", binary=str(old)).stdout.splitlines()
    assert table[1].split() == ["old", "6"]  # no color: an empty cell
    kubectl(
        kc, "patch", "wd", "old", "--type", "merge", "-p", '{"spec":{"size":7}}', binary=str(old)
    )
    unknown = _manifest(tmp_path, "unk", {"size": 2, "bogus": True})
    strict = kubectl(kc, "apply", "-f", str(unknown), binary=str(old), check=False)
    assert strict.returncode != 0 and 'unknown field "spec.bogus"' in strict.stderr
    assert "size" in kubectl(kc, "explain", "widgets.spec", binary=str(old)).stdout
    kubectl(kc, "delete", "wd", "old", binary=str(old))


def test_cpctl_kube_up_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc, info = _start(tmp_path / "kube")
    etcd = urlsplit(info["etcd_endpoints"][0])
    assert Path(info["kubeconfig"]).exists() and info["url"].startswith("https://")
    assert _stop(proc) == 0
    with pytest.raises(OSError):  # the embedded etcd went with it
        socket.create_connection((etcd.hostname, etcd.port), timeout=2).close()
