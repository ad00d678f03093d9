"""``cp-cni install`` / ``uninstall`` against a temporary root (bin and conf dirs under
tmp_path): the files, their modes and content, a no-op re-run, and an uninstall that
removes exactly what was installed."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.cni.install import BIN_MODE, CONF_MODE, CONFLIST_NAME
from controlplane.cni.main import parse_netconf
from controlplane.cni.shim import SHIM_SRC_DIR, ShimUnavailable, build_shim, find_shim
from tests.helpers import requires, tools_unmet

CMD = [sys.executable, "-m", "controlplane.cni.main"]


def _cni(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, check=False, timeout=30)


@pytest.fixture
def root(tmp_path: Path) -> tuple[Path, Path, Path]:
    source = tmp_path / "src" / "cp-cni"
    source.parent.mkdir()
    source.write_text("#!/usr/bin/python3\nfrom controlplane.cni.main import main\nmain()\n")
    return tmp_path / "opt/cni/bin", tmp_path / "etc/cni/net.d", source


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_rerun_uninstall(root: tuple[Path, Path, Path]) -> None:
    bin_dir, conf_dir, source = root
    dirs = ["--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir), "--source", str(source)]
    conf_args = ["--agent-socket", "/run/cp/a.sock", "--mtu", "1450", "--label", "k8s:x=y"]
    done = _cni("install", *dirs, *conf_args, "--bpf-object", "/opt/cp/cp_datapath.o")
    assert done.returncode == 0, done.stderr
    binary, conf = bin_dir / "cp-cni", conf_dir / CONFLIST_NAME
    assert binary.read_bytes() == source.read_bytes() and _mode(binary) == BIN_MODE
    assert _mode(conf) == CONF_MODE
    data = json.loads(conf.read_text())
    assert data["cniVersion"] == "1.0.0" and data["name"] == "cp"
    (plugin,) = data["plugins"]
    assert plugin["type"] == "cp-cni"
    # the plugin's own parser takes it (the runtime adds cniVersion and name to each plugin)
    parsed = parse_netconf({"cniVersion": data["cniVersion"], "name": data["name"], **plugin})
    assert str(parsed.agent_socket) == "/run/cp/a.sock" and parsed.mtu == 1450
    assert parsed.labels == ("k8s:x=y",) and str(parsed.bpf_object) == "/opt/cp/cp_datapath.o"
    assert str(parsed.pin_dir) == "/sys/fs/bpf/cp"

    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (binary, conf)}
    again = _cni("install", *dirs, *conf_args, "--bpf-object", "/opt/cp/cp_datapath.o")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (binary, conf)} == before
    assert sorted(p.name for p in bin_dir.iterdir()) == ["cp-cni"]  # no temporary left

    # foreign files beside ours survive the uninstall
    (bin_dir / "bridge").write_bytes(b"\x7fELF other plugin")
    (conf_dir / "10-other.conflist").write_text('{"plugins": [{"type": "bridge"}]}')
    gone = _cni("uninstall", *dirs)
    assert gone.returncode == 0, gone.stderr
    assert not binary.exists() and not conf.exists()
    assert sorted(p.name for p in bin_dir.iterdir()) == ["bridge"]
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-other.conflist"]
    assert "nothing to do" in _cni("install", *dirs, "--uninstall").stdout


def test_a_changed_config_is_rewritten_and_foreign_same_names_are_kept(
    root: tuple[Path, Path, Path],
) -> None:
    bin_dir, conf_dir, source = root
    dirs = ["--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir), "--source", str(source)]
    assert _cni("install", *dirs).returncode == 0
    conf = conf_dir / CONFLIST_NAME
    assert "mtu" not in conf.read_text()
    changed = _cni("install", *dirs, "--mtu", "1400")
    assert changed.returncode == 0 and str(conf) in changed.stdout
    assert json.loads(conf.read_text())["plugins"][0]["mtu"] == 1400
    # someone else's files under our names are not ours to remove
    conf.write_text('{"plugins": [{"type": "bridge"}]}')
    (bin_dir / "cp-cni").write_bytes(b"\x7fELF not ours")
    assert _cni("uninstall", *dirs).returncode == 0
    assert conf.exists() and (bin_dir / "cp-cni").exists()


@pytest.mark.parametrize(
    "args",
    [["install", "--mtu", "9"], ["install", "--nope"], ["uninstall", "--mtu", "1400"]],
)
def test_bad_flags_exit_2_with_one_line(args: list[str]) -> None:
    bad = _cni(*args)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_unreadable_source_is_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = _cni("install", "--bin-dir", str(tmp_path / "b"), "--conf-dir", str(tmp_path / "c"),
               "--source", str(tmp_path / "missing"))  # fmt: skip
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_bpf_object_netconf_field_is_checked() -> None:
    from controlplane.cni.main import CNIError

    with pytest.raises(CNIError, match="bpfObject"):
        parse_netconf({"cniVersion": "1.0.0", "name": "cp", "type": "cp-cni", "bpfObject": 3})


def test_the_daemonset_installs_and_uninstalls_the_plugin() -> None:
    import yaml

    ds = yaml.safe_load((Path(__file__).resolve().parents[1] / "agent/daemonset.yaml").read_text())
    spec = ds["spec"]["template"]["spec"]
    paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert paths["cni-bin"] == "/opt/cni/bin" and paths["cni-conf"] == "/etc/cni/net.d"
    assert paths["bpffs"] == "/sys/fs/bpf"
    (init,) = spec["initContainers"]
    assert init["command"] == ["cp-cni", "install"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    args = dict(a.split("=", 1) for a in init["args"])
    assert args["--bin-dir"] == mounts["cni-bin"] and args["--conf-dir"] == mounts["cni-conf"]
    assert mounts["bpffs"] == "/sys/fs/bpf"
    (agent,) = spec["containers"]
    assert "--set-sysctls" in agent["args"]
    stop = " ".join(agent["lifecycle"]["preStop"]["exec"]["command"])
    assert f"cp-cni uninstall --bin-dir={mounts['cni-bin']} --conf-dir={mounts['cni-conf']}" in stop
    # the default source: the launcher binary (test_manifests checks what the agent needs
    # to run the plugin for it)
    assert not any(a.startswith("--source") for a in init["args"])


@requires(tools_unmet("cc", "make"))
def test_install_puts_the_launcher_binary_on_the_node(tmp_path: Path) -> None:
    """Without --source: the launcher (built in this source tree), which runs with an
    empty environment; uninstall removes it."""
    bin_dir, conf_dir = tmp_path / "opt/cni/bin", tmp_path / "etc/cni/net.d"
    dirs = ["--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir)]
    done = _cni("install", *dirs)
    assert done.returncode == 0, done.stderr
    binary = bin_dir / "cp-cni"
    assert binary.read_bytes() == find_shim().read_bytes() and _mode(binary) == BIN_MODE
    version = subprocess.run(
        [binary], input="", capture_output=True, text=True, env={"CNI_COMMAND": "VERSION"}
    )
    assert version.returncode == 0, version
    assert json.loads(version.stdout)["supportedVersions"] == ["0.4.0", "1.0.0"]
    assert _cni("uninstall", *dirs).returncode == 0
    assert list(bin_dir.iterdir()) == [] and list(conf_dir.iterdir()) == []


@requires(tools_unmet("cc", "make"))
def test_the_source_tree_launcher_is_rebuilt_when_stale(tmp_path: Path) -> None:
    src = tmp_path / "cni"
    shutil.copytree(SHIM_SRC_DIR, src, ignore=shutil.ignore_patterns("cp-cni"))
    built = build_shim(src)
    assert built == src / "cp-cni" and built.stat().st_mode & 0o111
    first = built.stat().st_mtime_ns
    assert build_shim(src).stat().st_mtime_ns == first  # up to date: not rebuilt
    source = src / "cp-cni-shim.c"
    os.utime(source, ns=(first + 10**9, first + 10**9))
    assert build_shim(src).stat().st_mtime_ns > first
    source.write_text(source.read_text() + "\nint broken(void) { return }\n")
    with pytest.raises(ShimUnavailable, match="make -C"):
        build_shim(src)
