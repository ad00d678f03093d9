"""The daemons' image (Containerfile), built by scripts/build-image with podman (no Docker
engine, no registry: the Debian base is made with mmdebstrap) and run with podman:

- every entry point answers --help, the tools the agent needs (bpftool, ip) run, the
  operator and the relay run as nobody on a read-only root, the labels name the sources;
- in a privileged container with the host's bpffs, the agent's datapath loader loads the
  object packaged in the installed wheel (not a source tree) and pins the maps.

The image is built once per source tree under a tag of its own (a second run with the same
sources builds nothing: scripts/build-image compares its source-digest label).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from functools import cache
from pathlib import Path

import pytest

from controlplane.datapath import loader
from tests.helpers import kernel_maps_unmet, no_privilege, requires, tools_unmet
from tests.test_wheel_datapath import CHECK, PACKAGED

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "scripts" / "build-image"
# Per source tree: worktrees sharing a machine do not run each other's image.
IMAGE = f"localhost/controlplane:test-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"
SITE = "/opt/controlplane/lib/python3.11/site-packages"

# Building: the Debian base (mmdebstrap), then two stages with apt and pip (about two minutes
# on a fresh machine, seconds when the image is up to date).
pytestmark = [
    requires(None if os.geteuid() == 0 else no_privilege("not root (podman here builds as root)")),
    requires(tools_unmet("podman", "mmdebstrap")),
    pytest.mark.image,
    pytest.mark.timeout(1200),
]


@cache
def run_options() -> tuple[str, ...]:
    done = subprocess.run(
        [str(BUILD), "--run-options"], capture_output=True, text=True, check=True, timeout=60
    )
    return tuple(done.stdout.split())


@pytest.fixture(scope="module")
def image() -> str:
    done = subprocess.run(
        [str(BUILD), "--image", IMAGE], capture_output=True, text=True, check=False, timeout=1100
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == IMAGE
    return IMAGE


def podman_run(image: str, *argv: str, options: tuple[str, ...] = ()) -> str:
    done = subprocess.run(
        ["podman", "run", "--rm", "--network=none", *run_options(), *options, image, *argv],
        capture_output=True, text=True, check=False, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("cp-agent", "--help"), "usage: cp-agent"),
        (("cp-operator", "--help"), "usage: cp-operator"),
        (("cp-relay", "--help"), "usage: cp-relay"),
        (("cpctl", "--help"), "usage: cpctl"),
        (("cp-cni", "--help"), "usage: cp-cni"),
        (("bpftool", "version"), "bpftool v"),
        (("ip", "-V"), "iproute2"),
        (("tc", "-V"), "iproute2"),
    ],
)
def test_the_commands_run(image: str, argv: tuple[str, ...], expected: str) -> None:
    assert expected in podman_run(image, *argv)


@pytest.mark.parametrize("daemon", ["cp-operator", "cp-relay"])
def test_the_operator_and_relay_run_as_nobody_on_a_read_only_root(image: str, daemon: str) -> None:
    """As their manifests run them: user 65534, read-only root, no capabilities."""
    options = ("--user=65534:65534", "--read-only", "--cap-drop=all")
    assert f"usage: {daemon}" in podman_run(image, daemon, "--help", options=options)
    assert podman_run(image, "id", "-u", options=options).strip() == "65534"


def test_the_labels_name_the_sources(image: str) -> None:
    done = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{json .Labels}}", image],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    labels = json.loads(done.stdout)
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    version = subprocess.run(
        [str(BUILD), "--name"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert labels["org.opencontainers.image.version"] == version.rsplit(":", 1)[1]
    assert labels["org.opencontainers.image.revision"] in (head, f"{head}-dirty")
    assert len(labels["io.controlplane.source-digest"]) == 64
    assert labels["org.opencontainers.image.title"] == "controlplane"


@requires(kernel_maps_unmet())
def test_the_packaged_datapath_loads_in_a_privileged_container(image: str) -> None:
    """The loader in the image finds the object of the installed wheel (no clang, no source
    tree there) and loads it, its maps pinned in the host's bpffs and unpinned after."""
    pin = Path("/sys/fs/bpf") / f"cp-image-{os.getpid()}"
    options = ("--privileged", "--volume=/sys/fs/bpf:/sys/fs/bpf")
    try:
        reason = podman_run(
            image, "python", "-c",
            "from controlplane.datapath import loader; print(loader.datapath_unavailable_reason())",
            options=options,
        )  # fmt: skip
        out = json.loads(podman_run(image, "python", "-c", CHECK, str(pin), options=options))
    finally:
        for p in pin.glob("*"):
            p.unlink()
        if pin.exists():
            pin.rmdir()
    assert reason.strip() == "None"
    assert out["package"] == f"{SITE}/controlplane/__init__.py", out
    assert out["object"] == f"{SITE}/{PACKAGED}cp_datapath.o", out
    assert all(fd >= 0 for fd in out["fds"]) and set(loader.SHARED_MAPS) <= set(out["pins"])
    assert not pin.exists()


def test_the_install_step_puts_the_static_launcher_on_the_host(image: str, tmp_path: Path) -> None:
    """What the agent DaemonSet's install-cni init container does: `cp-cni install` from the
    image writes the wheel's static launcher and the conflist into the host's directories,
    and the launcher runs on the host (no Python of the image needed there)."""
    host_bin, host_conf = tmp_path / "bin", tmp_path / "net.d"
    host_bin.mkdir()
    host_conf.mkdir()
    options = (
        f"--volume={host_bin}:/host/opt/cni/bin",
        f"--volume={host_conf}:/host/etc/cni/net.d",
    )
    podman_run(
        image, "cp-cni", "install", "--bin-dir=/host/opt/cni/bin",
        "--conf-dir=/host/etc/cni/net.d", options=options,
    )  # fmt: skip
    launcher = host_bin / "cp-cni"
    assert b"/opt/controlplane" not in launcher.read_bytes()[:256]  # not a script of the image
    assert (
        b".interp"
        not in subprocess.run(
            ["readelf", "-S", str(launcher)], capture_output=True, check=True, timeout=60
        ).stdout
    )  # static: no ELF interpreter
    done = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: cp-cni"), done
    conflist = json.loads((host_conf / "05-cp.conflist").read_text())
    assert conflist["plugins"][0]["type"] == "cp-cni"
