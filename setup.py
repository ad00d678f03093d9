"""Build step: the tc datapath object ships inside the wheel.

Everything else is declared in pyproject.toml. ``build_py`` compiles ``bpf/*.c`` with clang
(``-target bpf``) into ``controlplane/datapath/bpf/`` of the build tree and copies the C
sources and Makefile beside the object, so an installed (non-editable) package carries
its datapath and the means to rebuild it (``make -C <site-packages>/controlplane/datapath/bpf``).
It also builds the node's CNI launcher (``make -C cni OUT=...``: a static C binary, see
``cni/cp-cni-shim.c``) into ``controlplane/cni/bin/cp-cni``, which ``cp-cni install`` copies
into the host's CNI bin directory. An editable install builds nothing here: the loader
builds ``bpf/`` and ``cp-cni install`` builds ``cni/`` in the source tree when missing or
stale.

``CLANG`` names the compiler, ``ARCH_INCLUDE`` the directory holding ``asm/types.h``
(default ``/usr/include/<machine>-linux-gnu``).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SRC = Path(__file__).resolve().parent / "bpf"
PACKAGE_DIR = ("controlplane", "datapath", "bpf")
SHIM_SRC = Path(__file__).resolve().parent / "cni"
SHIM_PACKAGE_PATH = ("controlplane", "cni", "bin", "cp-cni")
CFLAGS = ("-O2", "-g", "-Wall", "-Werror", "-target", "bpf")


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        self.build_bpf(Path(self.build_lib).joinpath(*PACKAGE_DIR))
        self.build_shim(Path(self.build_lib).resolve().joinpath(*SHIM_PACKAGE_PATH))

    def build_shim(self, out: Path) -> None:
        missing = [t for t in ("make", os.environ.get("CC", "cc")) if shutil.which(t) is None]
        if missing:
            raise SystemExit(
                f"building the CNI launcher needs {' and '.join(missing)} (and libc6-dev)"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["make", "-C", str(SHIM_SRC), f"OUT={out}"]
        self.announce(" ".join(cmd), level=2)
        subprocess.run(cmd, check=True)

    def build_bpf(self, out: Path) -> None:
        clang = os.environ.get("CLANG", "clang")
        if shutil.which(clang) is None:
            raise SystemExit(
                f"building the datapath needs {clang} (with the BPF target) and libbpf-dev"
            )
        include = os.environ.get("ARCH_INCLUDE", f"/usr/include/{platform.machine()}-linux-gnu")
        out.mkdir(parents=True, exist_ok=True)
        for path in [*sorted(SRC.glob("*.c")), *sorted(SRC.glob("*.h")), SRC / "Makefile"]:
            shutil.copyfile(path, out / path.name)
        for source in sorted(SRC.glob("*.c")):
            obj = out / (source.stem + ".o")
            cmd = [clang, *CFLAGS, f"-I{include}", "-c", str(source), "-o", str(obj)]
            self.announce(" ".join(cmd), level=2)
            subprocess.run(cmd, check=True)


setup(cmdclass={"build_py": BuildPyWithBpf})
