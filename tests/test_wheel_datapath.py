"""The datapath ships with the package: a wheel built from a copy of the source tree carries
``controlplane/datapath/bpf/cp_datapath.o`` (and its C sources), and a fresh virtual
environment with only that wheel installed (its dependencies reached through a path entry
to the project's environment, never the source tree) finds and loads the object: one
program instance against maps pinned in a per-test directory, unpinned afterwards.
So does the node's CNI launcher (``controlplane/cni/bin/cp-cni``, a static binary), which
that environment's ``cp-cni install`` puts into a temporary CNI bin directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from controlplane.datapath import loader
from tests.helpers import kernel_tests_unmet, requires

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("controlplane", "bpf", "cni", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")
PACKAGED = "controlplane/datapath/bpf/"
SHIM = "controlplane/cni/bin/cp-cni"

CHECK = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import controlplane
    from controlplane.datapath import loader
    pin = Path(sys.argv[1])
    obj = loader.find_object()
    out = {"package": controlplane.__file__, "object": str(obj)}
    try:
        with loader.load_program(7, pin) as prog:
            out["fds"] = [prog.prog_fd, prog.from_fd]
    finally:
        out["pins"] = sorted(p.name for p in pin.iterdir()) if pin.exists() else []
        for p in pin.glob("*"):
            p.unlink()
        if pin.exists():
            pin.rmdir()
    print(json.dumps(out))
    """
)


# The wheel's build step compiles bpf/*.c with clang; loading needs root, eBPF and libbpf.
pytestmark = requires(kernel_tests_unmet())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.o", "*.egg-info", "cp-cni")
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = base / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(dist), str(src)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (whl,) = dist.glob("controlplane-*.whl")
    return whl


def test_the_wheel_carries_the_object_and_its_sources(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        obj = z.read(PACKAGED + "cp_datapath.o")
    assert {PACKAGED + n for n in ("cp_datapath.c", "cp_maps.h", "Makefile")} <= names
    assert obj[:4] == b"\x7fELF" and obj[18:20] == (247).to_bytes(2, "little")  # EM_BPF


def test_the_wheel_carries_the_cni_launcher(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(SHIM)
        shim = z.read(SHIM)
    assert shim[:4] == b"\x7fELF" and b"/v1/cni" in shim
    assert (info.external_attr >> 16) & 0o111, oct(info.external_attr >> 16)  # executable


def test_a_fresh_venv_loads_the_packaged_object(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # the dependencies (msgspec, pyroute2...) from the project's environment: a plain path
    # entry, so that environment's .pth files (the editable install) are not processed
    Path(site, "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    pin = Path("/sys/fs/bpf") / f"cp-wheel-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", loader.OBJECT_ENV)}
    try:
        run = subprocess.run(
            [str(py), "-c", CHECK, str(pin)],
            capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path, env=env,
        )  # fmt: skip
    finally:
        for p in pin.glob("*"):
            p.unlink()
        if pin.exists():
            pin.rmdir()
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert Path(out["package"]).is_relative_to(Path(site)), out
    assert out["object"] == str(Path(site) / PACKAGED / "cp_datapath.o"), out
    assert all(fd >= 0 for fd in out["fds"]) and set(loader.SHARED_MAPS) <= set(out["pins"])
    assert not pin.exists()

    # cp-cni install (the init container's command) installs the packaged launcher
    root = tmp_path / "host"
    dirs = [f"--bin-dir={root}/opt/cni/bin", f"--conf-dir={root}/etc/cni/net.d"]
    done = subprocess.run(
        [str(venv / "bin" / "cp-cni"), "install", *dirs],
        capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    installed = root / "opt/cni/bin/cp-cni"
    assert installed.read_bytes() == (Path(site) / SHIM).read_bytes()
    shown = subprocess.run([installed, "--help"], capture_output=True, text=True, env={})
    assert shown.returncode == 0 and shown.stdout.startswith("usage: cp-cni"), shown
    # an environment without its launcher can still uninstall the node's (by its marker);
    # it cannot install one: one line saying so
    (Path(site) / SHIM).unlink()
    again = subprocess.run(
        [str(venv / "bin" / "cp-cni"), "install", *dirs],
        capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert again.returncode == 1 and "no CNI launcher" in again.stderr, again
    assert len(again.stderr.strip().splitlines()) == 1
    removed = subprocess.run(
        [str(venv / "bin" / "cp-cni"), "uninstall", *dirs],
        capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    assert not installed.exists() and not (root / "etc/cni/net.d/05-cp.conflist").exists()


def test_an_override_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loader.OBJECT_ENV, str(tmp_path / "nope.o"))
    with pytest.raises(loader.BpfUnavailableError, match=r"nope\.o does not exist"):
        loader.find_object()
    obj = tmp_path / "mine.o"
    obj.write_bytes(b"x")
    monkeypatch.setenv(loader.OBJECT_ENV, str(obj))
    assert loader.find_object() == obj
    assert loader.find_object(tmp_path / "mine.o") == obj  # the netconf's field wins too
