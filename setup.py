"""Build step: the tc datapath object ships inside the wheel.

Everything else is declared in pyproject.toml. ``build_py`` compiles ``bpf/*.c`` with clang
(``-target bpf``) into ``controlplane/datapath/bpf/`` of the build tree and copies the C
sources and Makefile beside the object, so an installed (non-editable) package carries
its datapath and the means to rebuild it (``make -C <site-packages>/controlplane/datapath/bpf``).
An editable install builds nothing here: the loader builds ``bpf/`` in the source tree
when the object is missing or stale.

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
CFLAGS = ("-O2", "-g", "-Wall", "-Werror", "-target", "bpf")


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        self.build_bpf(Path(self.build_lib).joinpath(*PACKAGE_DIR))

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
