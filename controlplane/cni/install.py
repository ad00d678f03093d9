"""``cp-cni install`` / ``cp-cni uninstall``: put the plugin and its conflist on a node.

As Cilium's agent DaemonSet does from an init container: the ``cp-cni`` executable is
copied into the host's CNI bin directory (mode 0755) and ``05-cp.conflist`` written into
its CNI config directory (mode 0644), both atomically (a temporary file renamed into
place, so a runtime never sees half a file) and only when their content differs, so a
re-run changes nothing. ``uninstall`` removes the two files, and only when they are ours
(the conflist's plugin has type ``cp-cni``; the executable is the one we would install or
a launcher of ``controlplane.cni``); anything else in those directories is left alone.

The executable installed by default is the node's launcher (:mod:`controlplane.cni.shim`):
a static binary that needs nothing on the host and hands each call to the agent, which
runs the plugin (``POST /v1/cni``). ``--source`` installs another file instead (e.g. the
Python ``cp-cni`` script, for a host that has this package at the same path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from controlplane.cni.shim import PACKAGED_SHIM, ShimUnavailable, find_shim
from controlplane.flags import Parser

__all__ = [
    "BINARY_NAME",
    "CONFLIST_NAME",
    "InstallError",
    "Installer",
    "conflist",
    "main",
]

BINARY_NAME: Final = "cp-cni"
CONFLIST_NAME: Final = "05-cp.conflist"
NETWORK_NAME: Final = "cp"
CNI_VERSION: Final = "1.0.0"
BIN_MODE: Final = 0o755
CONF_MODE: Final = 0o644
_MARKER: Final = b"controlplane.cni"


class InstallError(RuntimeError):
    """The plugin could not be installed or removed."""


def conflist(
    *,
    agent_socket: str | None = None,
    pin_dir: str | None = None,
    mtu: int | None = None,
    labels: Sequence[str] = (),
    bpf_object: str | None = None,
) -> dict[str, Any]:
    """The network configuration list the runtime hands to ``cp-cni`` (defaults omitted)."""
    plugin: dict[str, Any] = {"type": BINARY_NAME}
    if agent_socket is not None:
        plugin["agentSocket"] = agent_socket
    if pin_dir is not None:
        plugin["pinDir"] = pin_dir
    if mtu is not None:
        plugin["mtu"] = mtu
    if labels:
        plugin["labels"] = list(labels)
    if bpf_object is not None:
        plugin["bpfObject"] = bpf_object
    return {"cniVersion": CNI_VERSION, "name": NETWORK_NAME, "plugins": [plugin]}


def default_source() -> Path:
    """The launcher binary (packaged, or built in a source tree)."""
    try:
        return find_shim()
    except ShimUnavailable as e:
        raise InstallError(f"{e} (or name the executable to install with --source)") from None


def _write_if_changed(path: Path, content: bytes, mode: int) -> bool:
    """Write ``content`` to ``path`` atomically; False when it already holds it."""
    try:
        st = path.stat()
        if (st.st_mode & 0o7777) == mode and path.read_bytes() == content:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


@dataclass(frozen=True, slots=True)
class Installer:
    bin_dir: Path
    conf_dir: Path
    source: Path
    config: dict[str, Any]

    @property
    def binary(self) -> Path:
        return self.bin_dir / BINARY_NAME

    @property
    def conf(self) -> Path:
        return self.conf_dir / CONFLIST_NAME

    def _conf_bytes(self) -> bytes:
        return (json.dumps(self.config, indent=2) + "\n").encode()

    def install(self) -> list[str]:
        """Install both files; returns what changed (empty when nothing did)."""
        try:
            binary = self.source.read_bytes()
        except OSError as e:
            raise InstallError(f"cannot read {self.source}: {e.strerror}") from None
        changed = []
        try:
            if _write_if_changed(self.binary, binary, BIN_MODE):
                changed.append(str(self.binary))
            if _write_if_changed(self.conf, self._conf_bytes(), CONF_MODE):
                changed.append(str(self.conf))
        except OSError as e:
            raise InstallError(f"{e.filename}: {e.strerror}") from None
        return changed

    def _ours_binary(self) -> bool:
        try:
            content = self.binary.read_bytes()
        except FileNotFoundError:
            return False
        try:
            if content == self.source.read_bytes():
                return True
        except OSError:
            pass
        return _MARKER in content

    def _ours_conf(self) -> bool:
        try:
            data = json.loads(self.conf.read_text())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return False
        plugins = data.get("plugins") if isinstance(data, dict) else None
        return isinstance(plugins, list) and any(
            isinstance(p, dict) and p.get("type") == BINARY_NAME for p in plugins
        )

    def uninstall(self) -> list[str]:
        """Remove the files we installed (the conflist first: no new pod reaches us)."""
        removed = []
        try:
            if self._ours_conf():
                self.conf.unlink()
                removed.append(str(self.conf))
            if self._ours_binary():
                self.binary.unlink()
                removed.append(str(self.binary))
        except OSError as e:
            raise InstallError(f"{e.filename}: {e.strerror}") from None
        return removed


def _mtu(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 68 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 68..65535")
    return value


def _parser(command: str) -> Parser:
    p = Parser(
        prog=f"cp-cni {command}",
        description=(
            "Install cp-cni into the CNI bin directory and write its conflist "
            f"({CONFLIST_NAME}) into the CNI config directory; idempotent."
            if command == "install"
            else "Remove the cp-cni executable and conflist that `cp-cni install` wrote."
        ),
    )
    p.add_argument("--bin-dir", type=Path, default=Path("/opt/cni/bin"))
    p.add_argument("--conf-dir", type=Path, default=Path("/etc/cni/net.d"))
    p.add_argument(
        "--source", type=Path, help="the executable to install (default: the launcher binary)"
    )
    if command == "install":
        p.add_argument("--uninstall", action="store_true", help="remove instead")
        p.add_argument("--agent-socket", help="agentSocket (default /var/run/cp/agent.sock)")
        p.add_argument("--pin-dir", help="pinDir (default /sys/fs/bpf/cp)")
        p.add_argument("--mtu", type=_mtu, help="mtu of both veth ends")
        p.add_argument("--label", action="append", default=[], help="labels (repeatable)")
        p.add_argument("--bpf-object", help="bpfObject (default: the packaged object)")
    return p


def main(argv: Sequence[str]) -> int:
    """``argv[0]`` is ``install`` or ``uninstall``."""
    command, rest = argv[0], list(argv[1:])
    args = _parser(command).parse_args(rest)
    uninstall = command == "uninstall" or args.uninstall
    source = PACKAGED_SHIM
    try:
        if args.source is not None:
            source = args.source
        elif uninstall:  # needs no launcher: ours is recognised by its marker too
            with contextlib.suppress(InstallError):
                source = default_source()
        else:
            source = default_source()
        config = (
            conflist()
            if uninstall
            else conflist(
                agent_socket=args.agent_socket,
                pin_dir=args.pin_dir,
                mtu=args.mtu,
                labels=args.label,
                bpf_object=args.bpf_object,
            )
        )
        installer = Installer(args.bin_dir, args.conf_dir, source, config)
        changed = installer.uninstall() if uninstall else installer.install()
    except InstallError as e:
        print(f"cp-cni {command}: {e}", file=sys.stderr)
        return 1
    verb = "removed" if uninstall else "installed"
    print(
        f"cp-cni {command}: {verb} {', '.join(changed)}"
        if changed
        else f"cp-cni {command}: nothing to do"
    )
    return 0
