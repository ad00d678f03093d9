"""Load the tc datapath program with libbpf (through ctypes) and attach it with pyroute2.

One object instance per endpoint: the endpoint id is written into the object's
``.rodata`` (``cp_cfg``) before load, while every map (``cp_ipcache``, ``cp_policy``,
``cp_endpoints``, ``cp_metrics``, ``cp_ct``) is pinned by name under one pin directory and
reused by every later load, so maps are shared by all endpoints and outlive the agent.

``cp_to_endpoint`` goes on the clsact **egress** hook of the endpoint's host-side veth
(packets toward the pod: the pod's ingress policy) and ``cp_from_endpoint`` on its
**ingress** hook (packets from the pod: the flows it opens, whose replies then pass), both
in direct-action mode. Once attached, the kernel's tc filters hold the programs; the
libbpf object is closed right away.

Network namespaces are entered with ``setns(CLONE_NEWNET)`` on ``/run/netns/NAME`` and
left again, never a mount namespace: ``ip netns exec`` / ``tc -n`` remount ``/sys``
privately, so pins made from there land in a throwaway bpffs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from controlplane.datapath.layouts import (
    CT_MAP_NAME,
    ENDPOINTS_MAP_NAME,
    FLOW_MAP_NAMES,
    METRICS_MAP_NAME,
    POLICY_MAP_NAME,
    Config,
)

__all__ = [
    "BPF_SRC_DIR",
    "DEFAULT_PIN_DIR",
    "FROM_PROGRAM_NAME",
    "OBJECT_ENV",
    "OBJECT_PATH",
    "PACKAGED_OBJECT",
    "PROGRAM_NAME",
    "SHARED_MAPS",
    "BpfUnavailableError",
    "LoadedProgram",
    "LoaderError",
    "attach",
    "build_object",
    "datapath_unavailable_reason",
    "detach",
    "ensure_bpffs",
    "find_object",
    "in_netns",
    "is_attached",
    "load_and_attach",
    "load_program",
]

# The source tree's bpf/ (a checkout or an editable install), built by `make` when stale.
BPF_SRC_DIR: Final = Path(__file__).resolve().parents[2] / "bpf"
OBJECT_PATH: Final = BPF_SRC_DIR / "cp_datapath.o"
# Built into the wheel by setup.py (with the C sources and Makefile beside it).
PACKAGED_OBJECT: Final = Path(__file__).resolve().parent / "bpf" / "cp_datapath.o"
# Points the loader at another object (a rebuilt one); cp-cni's netconf `bpfObject` wins.
OBJECT_ENV: Final = "CP_BPF_OBJECT"
PROGRAM_NAME: Final = "cp_to_endpoint"
FROM_PROGRAM_NAME: Final = "cp_from_endpoint"
DEFAULT_PIN_DIR: Final = Path("/sys/fs/bpf/cp")
SHARED_MAPS: Final = (
    "cp_ipcache",
    POLICY_MAP_NAME,
    ENDPOINTS_MAP_NAME,
    METRICS_MAP_NAME,
    CT_MAP_NAME,
    *FLOW_MAP_NAMES,
)

_BPFFS_MAGIC: Final = 0xCAFE4A11
_CLONE_NEWNET: Final = 0x40000000
_CLSACT_EGRESS: Final = "ffff:fff3"
_CLSACT_INGRESS: Final = "ffff:fff2"
_FILTER_PRIO: Final = 1
_FILTER_HANDLE: Final = 1


class LoaderError(RuntimeError):
    """Building, loading or attaching the datapath program failed."""


class BpfUnavailableError(LoaderError):
    """This machine cannot run the kernel datapath (not root, no clang, no libbpf...)."""


# --- capability detection -------------------------------------------------------------


def _find_libbpf() -> str | None:
    for name in ("libbpf.so.1", ctypes.util.find_library("bpf")):
        if not name:
            continue
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name
    return None


def datapath_unavailable_reason(need_build: bool | None = None) -> str | None:
    """Why the kernel datapath cannot be used here, or None when it can.

    ``need_build`` (default: whether no object is found without building one, see
    :func:`find_object`) also requires clang.
    """
    if os.geteuid() != 0:
        return "not root (loading eBPF programs and pinning maps needs CAP_BPF/CAP_NET_ADMIN)"
    if _find_libbpf() is None:
        return "libbpf.so.1 not found (install libbpf1 / libbpf-dev)"
    if need_build is None:
        need_build = not (
            os.environ.get(OBJECT_ENV)
            or OBJECT_PATH.exists()
            or (not _in_source_tree() and PACKAGED_OBJECT.exists())
        )
    if need_build and shutil.which(os.environ.get("CLANG", "clang")) is None:
        return "clang not found: cannot build bpf/cp_datapath.o (install clang, libbpf-dev)"
    return None


# --- build ----------------------------------------------------------------------------


def _in_source_tree() -> bool:
    return (BPF_SRC_DIR / "cp_datapath.c").is_file() and (BPF_SRC_DIR / "Makefile").is_file()


def find_object(override: Path | None = None, *, name: str = OBJECT_PATH.name) -> Path:
    """The datapath object to load: ``override`` (cp-cni's ``bpfObject``), else
    ``$CP_BPF_OBJECT``, else the source tree's ``bpf/cp_datapath.o`` (built when missing or
    stale: a checkout or an editable install), else the one packaged in the wheel.
    ``name`` picks another object of ``bpf/`` (``cp_sock_lb.o``: then only ``override``,
    the source tree and the package are looked at)."""
    if override is None and name == OBJECT_PATH.name and os.environ.get(OBJECT_ENV):
        override = Path(os.environ[OBJECT_ENV])
    if override is not None:
        if not override.is_file():
            raise BpfUnavailableError(f"datapath object {override} does not exist")
        return override
    if _in_source_tree():
        return build_object(name=name)
    packaged = PACKAGED_OBJECT.with_name(name)
    if packaged.is_file():
        return packaged
    raise BpfUnavailableError(
        f"no datapath object: {packaged} is missing (a package built without clang?); "
        f"rebuild it with `make -C {packaged.parent}` or set {OBJECT_ENV}"
    )


def build_object(
    src_dir: Path = BPF_SRC_DIR, *, force: bool = False, name: str = OBJECT_PATH.name
) -> Path:
    """Run ``make -C bpf`` when the object ``name`` is missing or older than a source in
    ``src_dir`` (always with ``force``). An object older than its sources is used as it
    is where clang or make is missing (an installed copy whose files' times say little)."""
    obj = src_dir / name
    if obj.exists() and not force:
        built = obj.stat().st_mtime
        sources = [*src_dir.glob("*.c"), *src_dir.glob("*.h")]
        if all(src.stat().st_mtime <= built for src in sources):
            return obj
    missing = [t for t in (os.environ.get("CLANG", "clang"), "make") if shutil.which(t) is None]
    if missing:
        if obj.exists() and not force:
            return obj
        raise BpfUnavailableError(
            f"{obj} is missing and {' and '.join(missing)} not installed: install clang, "
            f"make and libbpf-dev, then run `make -C {src_dir}`"
        )
    proc = subprocess.run(["make", "-C", str(src_dir)], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not obj.exists():
        raise LoaderError(f"make -C {src_dir} failed:\n{proc.stdout}{proc.stderr}")
    return obj


# --- bpffs ----------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _is_bpffs(path: Path) -> bool:
    # struct statfs starts with the 8-byte f_type on 64-bit Linux; 120 bytes is the size.
    buf = ctypes.create_string_buffer(128)
    libc = _libc()
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return int.from_bytes(buf.raw[:8], "little") == _BPFFS_MAGIC


def ensure_bpffs(pin_dir: Path, mountpoint: Path = Path("/sys/fs/bpf")) -> None:
    """Make sure ``pin_dir`` exists on a bpffs, mounting bpffs at ``mountpoint`` if needed."""
    if not _is_bpffs(mountpoint):
        mountpoint.mkdir(parents=True, exist_ok=True)
        libc = _libc()
        if libc.mount(b"bpf", os.fsencode(mountpoint), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise LoaderError(f"mount -t bpf {mountpoint}: {os.strerror(err)}")
    pin_dir.mkdir(parents=True, exist_ok=True)
    if not _is_bpffs(pin_dir):
        raise LoaderError(f"{pin_dir} is not on a bpffs")


# --- libbpf through ctypes ------------------------------------------------------------


class _Libbpf:
    """The handful of libbpf 1.x calls the loader needs (opaque pointers as c_void_p)."""

    def __init__(self) -> None:
        name = _find_libbpf()
        if name is None:
            raise BpfUnavailableError("libbpf.so.1 not found (install libbpf1)")
        lib = ctypes.CDLL(name, use_errno=True)
        vp, cp, i, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
        self._sig(lib.bpf_object__open_file, vp, [cp, vp])
        self._sig(lib.bpf_object__find_map_by_name, vp, [vp, cp])
        self._sig(lib.bpf_map__set_pin_path, i, [vp, cp])
        self._sig(lib.bpf_map__set_initial_value, i, [vp, vp, sz])
        self._sig(lib.bpf_map__value_size, ctypes.c_uint32, [vp])
        self._sig(lib.bpf_object__load, i, [vp])
        self._sig(lib.bpf_object__find_program_by_name, vp, [vp, cp])
        self._sig(lib.bpf_program__fd, i, [vp])
        self._sig(lib.bpf_object__close, None, [vp])
        self.lib = lib

    @staticmethod
    def _sig(fn: Any, restype: Any, argtypes: list[Any]) -> None:
        fn.restype = restype
        fn.argtypes = argtypes


_LIBBPF: _Libbpf | None = None


def _libbpf() -> _Libbpf:
    global _LIBBPF
    if _LIBBPF is None:
        _LIBBPF = _Libbpf()
    return _LIBBPF


def _errstr(code: int) -> str:
    code = abs(code)
    return f"{errno.errorcode.get(code, code)}: {os.strerror(code)}"


@dataclass(slots=True)
class LoadedProgram:
    """A loaded (not yet attached) program pair for one endpoint: ``prog_fd`` is
    ``cp_to_endpoint``, ``from_fd`` ``cp_from_endpoint``."""

    endpoint_id: int
    prog_fd: int
    from_fd: int
    _obj: int | None

    def close(self) -> None:
        """Release the libbpf object (an attached program stays in the kernel)."""
        if self._obj is not None:
            _libbpf().lib.bpf_object__close(self._obj)
            self._obj = None
            self.prog_fd = self.from_fd = -1

    def __enter__(self) -> LoadedProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_program(
    endpoint_id: int, pin_dir: Path = DEFAULT_PIN_DIR, obj_path: Path | None = None
) -> LoadedProgram:
    """Open the object, point its maps at ``pin_dir`` (reuse or create+pin), set the
    endpoint id in ``.rodata``, and load it. ``obj_path`` defaults to :func:`find_object`'s
    choice (a source tree's object is built first when missing or stale)."""
    if not 0 <= endpoint_id < 2**32:
        raise ValueError(f"endpoint id {endpoint_id} out of range")
    path = find_object(obj_path)
    ensure_bpffs(pin_dir)
    lib = _libbpf().lib
    obj = lib.bpf_object__open_file(os.fsencode(path), None)
    if not obj:
        raise LoaderError(f"bpf_object__open_file({path}): {_errstr(ctypes.get_errno())}")
    try:
        for name in SHARED_MAPS:
            m = lib.bpf_object__find_map_by_name(obj, name.encode())
            if not m:
                raise LoaderError(f"{path}: no map {name}")
            rc = lib.bpf_map__set_pin_path(m, os.fsencode(pin_dir / name))
            if rc:
                raise LoaderError(f"bpf_map__set_pin_path({name}): {_errstr(rc)}")
        rodata = lib.bpf_object__find_map_by_name(obj, b".rodata")
        if not rodata:
            raise LoaderError(f"{path}: no .rodata (cp_cfg) section")
        cfg = Config(endpoint_id, 0)
        size = lib.bpf_map__value_size(rodata)
        if size != ctypes.sizeof(cfg):
            raise LoaderError(
                f"{path}: .rodata is {size} bytes, want {ctypes.sizeof(cfg)} (cp_cfg only)"
            )
        rc = lib.bpf_map__set_initial_value(rodata, ctypes.addressof(cfg), size)
        if rc:
            raise LoaderError(f"bpf_map__set_initial_value(.rodata): {_errstr(rc)}")
        rc = lib.bpf_object__load(obj)
        if rc:
            raise LoaderError(
                f"bpf_object__load({path}): {_errstr(rc)} (libbpf's log is on stderr; "
                f"an incompatible pinned map under {pin_dir} also fails here)"
            )
        fds = []
        for name in (PROGRAM_NAME, FROM_PROGRAM_NAME):
            prog = lib.bpf_object__find_program_by_name(obj, name.encode())
            if not prog:
                raise LoaderError(f"{path}: no program {name}")
            fd = lib.bpf_program__fd(prog)
            if fd < 0:
                raise LoaderError(f"bpf_program__fd({name}): {_errstr(fd)}")
            fds.append(fd)
    except BaseException:
        lib.bpf_object__close(obj)
        raise
    return LoadedProgram(endpoint_id, fds[0], fds[1], obj)


# --- network namespaces and tc ----------------------------------------------------------


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block in network namespace ``name`` (``/run/netns/NAME`` or a path); None
    stays put. Only the network namespace changes: sockets opened inside (netlink too)
    stay bound to it after the block; the filesystem view (and /sys/fs/bpf) does not."""
    if name is None:
        yield
        return
    target = name if "/" in name else f"/run/netns/{name}"
    libc = _libc()
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                raise LoaderError(f"setns({target}): {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)
        try:
            yield
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover - fatal
                raise LoaderError(f"setns(back): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(own)


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _ifindex(ipr: Any, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise LoaderError(f"no interface {ifname}")
    return int(idx[0])


def attach(prog: LoadedProgram, ifname: str, netns: str | None = None) -> None:
    """Attach ``prog``'s programs to ``ifname``'s clsact egress and ingress (direct-action),
    replacing previous cp filters there; creates the clsact qdisc when missing."""
    from pyroute2 import NetlinkError

    if prog.prog_fd < 0:
        raise LoaderError("program is closed")
    with in_netns(netns):
        ipr = _iproute()
    with ipr:
        idx = _ifindex(ipr, ifname)
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise LoaderError(f"add clsact on {ifname}: {e}") from e
        # The flow recorder first: replies to flows opened from then on are known to the
        # enforcing program by the time it runs.
        hooks = (
            ("ingress", _CLSACT_INGRESS, prog.from_fd, FROM_PROGRAM_NAME),
            ("egress", _CLSACT_EGRESS, prog.prog_fd, PROGRAM_NAME),
        )
        for hook, parent, fd, name in hooks:
            try:
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    idx,
                    _FILTER_HANDLE,
                    fd=fd,
                    name=f"{name}:{prog.endpoint_id}",
                    parent=parent,
                    prio=_FILTER_PRIO,
                    classid=1,
                    direct_action=True,
                )
            except NetlinkError as e:
                raise LoaderError(f"attach bpf filter on {ifname} {hook}: {e}") from e


def _filter_names(ipr: Any, idx: int, parent: str) -> list[str]:
    names = []
    for f in ipr.get_filters(index=idx, parent=parent):
        opts = f.get_attr("TCA_OPTIONS") if f.get_attr("TCA_KIND") == "bpf" else None
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if name:
            names.append(str(name))
    return names


def is_attached(ifname: str, netns: str | None = None) -> bool:
    """Whether both cp programs are attached on ``ifname`` (egress and ingress)."""
    with in_netns(netns):
        ipr = _iproute()
    with ipr:
        idx = _ifindex(ipr, ifname)
        return any(
            n.startswith(PROGRAM_NAME) for n in _filter_names(ipr, idx, _CLSACT_EGRESS)
        ) and any(n.startswith(FROM_PROGRAM_NAME) for n in _filter_names(ipr, idx, _CLSACT_INGRESS))


def detach(ifname: str, netns: str | None = None) -> bool:
    """Remove the clsact qdisc (and so the program) from ``ifname``. Idempotent: False
    when the interface has no clsact qdisc or does not exist."""
    from pyroute2 import NetlinkError

    with in_netns(netns):
        ipr = _iproute()
    with ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return False
        try:
            ipr.tc("del", "clsact", idx[0])
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                return False
            raise LoaderError(f"del clsact on {ifname}: {e}") from e
    return True


def load_and_attach(
    endpoint_id: int,
    ifname: str,
    *,
    netns: str | None = None,
    pin_dir: Path = DEFAULT_PIN_DIR,
    obj_path: Path | None = None,
) -> None:
    """Load a program instance for ``endpoint_id`` against the pinned maps and attach it on
    ``ifname``'s egress; the libbpf object is closed afterwards (tc keeps the program)."""
    with load_program(endpoint_id, pin_dir, obj_path) as prog:
        attach(prog, ifname, netns)
