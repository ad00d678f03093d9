"""Load the socket load balancer (``bpf/cp_sock_lb.o``) and hang it on a cgroup v2.

The object's maps are pinned by name under the agent's pin directory (the agent opens or
creates ``cp_lb_services``, ``cp_lb_slots`` and ``cp_lb_metrics`` first, exactly as
``bpf/cp_lb.h`` declares them, so libbpf reuses them; ``cp_lb_revnat`` is the program's
own). Each program (``cgroup/connect4``, ``sendmsg4``, ``recvmsg4``) is attached through a
**bpf_link pinned** at ``<pin_dir>/cp_lb_link_<hook>``: the link, and so the attachment,
outlives the agent (a SIGKILL does not interrupt service traffic), and a new agent swaps
its freshly loaded program into the existing link atomically
(``bpf_link__update_program``), so there is never a moment without translation.

Why socket-level and not tc DNAT: the translation happens once per connect (once per
datagram for unconnected UDP) instead of on every packet; the kernel never sees the VIP
on the wire, so no NAT conntrack, no reverse translation of TCP replies and no checksum
rewriting are needed; a service without backends is refused in the connect() call itself
(ECONNREFUSED) rather than by a forged RST or ICMP; and the tc programs' policy sees the
real backend address, so policy applies to the backend after translation for free. The
cost: only processes in the cgroup (pods) are balanced, not traffic routed through the
node from elsewhere, as Cilium's socket LB without its tc fallback.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from controlplane.datapath import loader
from controlplane.datapath.lbmap import (
    LB_METRICS_MAP_NAME,
    LB_REVNAT_MAP_NAME,
    LB_SERVICES_MAP_NAME,
    LB_SLOTS_MAP_NAME,
)

__all__ = [
    "LB_HOOKS",
    "SOCK_LB_OBJECT",
    "attach_sock_lb",
    "cgroup2_mount",
    "detach_sock_lb",
    "link_pin",
    "sock_lb_attached",
]

SOCK_LB_OBJECT: Final = "cp_sock_lb.o"
LB_HOOKS: Final = {
    "connect4": "cp_lb_connect4",
    "sendmsg4": "cp_lb_sendmsg4",
    "recvmsg4": "cp_lb_recvmsg4",
}
"""Hook -> program name in the object."""
log = logging.getLogger(__name__)

_MAPS: Final = (LB_SERVICES_MAP_NAME, LB_SLOTS_MAP_NAME, LB_REVNAT_MAP_NAME, LB_METRICS_MAP_NAME)


def link_pin(pin_dir: Path, hook: str) -> Path:
    return pin_dir / f"cp_lb_link_{hook}"


def cgroup2_mount(mounts: Path = Path("/proc/self/mounts")) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or, on hybrid hosts,
    ``/sys/fs/cgroup/unified``), or None."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


class _LinkLib:
    """The libbpf calls for programs on cgroups through pinned links."""

    def __init__(self) -> None:
        name = loader._find_libbpf()
        if name is None:
            raise loader.BpfUnavailableError("libbpf.so.1 not found (install libbpf1)")
        lib = ctypes.CDLL(name, use_errno=True)
        vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        sigs: Iterable[tuple[str, Any, list[Any]]] = (
            ("bpf_object__open_file", vp, [cp, vp]),
            ("bpf_object__find_map_by_name", vp, [vp, cp]),
            ("bpf_map__set_pin_path", i, [vp, cp]),
            ("bpf_object__load", i, [vp]),
            ("bpf_object__find_program_by_name", vp, [vp, cp]),
            ("bpf_object__close", None, [vp]),
            ("bpf_program__attach_cgroup", vp, [vp, i]),
            ("bpf_link__pin", i, [vp, cp]),
            ("bpf_link__open", vp, [cp]),
            ("bpf_link__update_program", i, [vp, vp]),
            ("bpf_link__destroy", i, [vp]),
        )
        for fn_name, restype, argtypes in sigs:
            fn = getattr(lib, fn_name)
            fn.restype = restype
            fn.argtypes = argtypes
        self.lib = lib


_LIB: _LinkLib | None = None


def _lib() -> Any:
    global _LIB
    if _LIB is None:
        _LIB = _LinkLib()
    return _LIB.lib


def _err(what: str, code: int | None = None) -> loader.LoaderError:
    code = abs(code) if code else ctypes.get_errno()
    name = errno.errorcode.get(code, str(code))
    return loader.LoaderError(f"{what}: {name}: {os.strerror(code)}")


def attach_sock_lb(pin_dir: Path, cgroup: Path, obj_path: Path | None = None) -> list[str]:
    """Load ``cp_sock_lb.o`` against the maps pinned under ``pin_dir`` and attach its
    programs to ``cgroup`` (a cgroup v2 directory) through pinned links: a new link
    where none is pinned, else the new program swapped into the pinned one. Returns what
    it did per hook (``connect4: attached`` / ``connect4: replaced``)."""
    path = loader.find_object(obj_path, name=SOCK_LB_OBJECT)
    loader.ensure_bpffs(pin_dir)
    lib = _lib()
    obj = lib.bpf_object__open_file(os.fsencode(path), None)
    if not obj:
        raise _err(f"bpf_object__open_file({path})")
    done: list[str] = []
    cg_fd = -1
    try:
        for name in _MAPS:
            m = lib.bpf_object__find_map_by_name(obj, name.encode())
            if not m:
                raise loader.LoaderError(f"{path}: no map {name}")
            rc = lib.bpf_map__set_pin_path(m, os.fsencode(pin_dir / name))
            if rc:
                raise _err(f"bpf_map__set_pin_path({name})", rc)
        rc = lib.bpf_object__load(obj)
        if rc:
            raise _err(
                f"bpf_object__load({path}) (libbpf's log is on stderr; an incompatible "
                f"pinned map under {pin_dir} also fails here)",
                rc,
            )
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for hook, prog_name in LB_HOOKS.items():
            prog = lib.bpf_object__find_program_by_name(obj, prog_name.encode())
            if not prog:
                raise loader.LoaderError(f"{path}: no program {prog_name}")
            pin = link_pin(pin_dir, hook)
            link = lib.bpf_link__open(os.fsencode(pin)) if pin.exists() else None
            if link:
                rc = lib.bpf_link__update_program(link, prog)
                lib.bpf_link__destroy(link)  # closes our fd; the pin keeps the link
                if rc == 0:
                    done.append(f"{hook}: replaced")
                    continue
                log.warning(
                    "%s: not a link of ours (%s): attaching anew", pin, os.strerror(abs(rc))
                )
            # the new link first, then the pin moves to it: never a moment without one
            link = lib.bpf_program__attach_cgroup(prog, cg_fd)
            if not link:
                raise _err(f"attach {prog_name} to cgroup {cgroup}")
            if pin.exists():
                pin.unlink()  # an old link of this hook detaches with its last reference
            rc = lib.bpf_link__pin(link, os.fsencode(pin))
            lib.bpf_link__destroy(link)  # unpinned (rc != 0): this detaches it again
            if rc:
                raise _err(f"bpf_link__pin({pin})", rc)
            done.append(f"{hook}: attached")
    finally:
        if cg_fd >= 0:
            os.close(cg_fd)
        lib.bpf_object__close(obj)  # the links hold the programs
    return done


def sock_lb_attached(pin_dir: Path) -> bool:
    """Whether every hook's link is pinned under ``pin_dir``."""
    return all(link_pin(pin_dir, hook).exists() for hook in LB_HOOKS)


def detach_sock_lb(pin_dir: Path) -> int:
    """Remove the pinned links (their programs detach once nothing else holds them);
    returns how many were removed."""
    removed = 0
    for hook in LB_HOOKS:
        try:
            link_pin(pin_dir, hook).unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
