"""Traffic for the load-balancing tests: a backend server and a client, as processes.

Run inside a pod's network namespace (``nsenter --net=...``); a client first moves itself
into ``--cgroup`` (the node's pod cgroup, where the socket load balancer hangs), as a
pod's processes live in its cgroup. Stand-alone: imports nothing of the project.

    lb_traffic.py serve NAME PORT
        TCP: answer every connection with NAME; UDP: answer every datagram with NAME.
        Prints "ready" once bound; runs until killed.
    lb_traffic.py client IP PORT --proto tcp|udp [--count N] [--cgroup DIR] ...
        One new socket per attempt, N attempts (0: until stdin is closed); prints one
        JSON line per attempt as it ends: [t, outcome, peer, seconds] with t the
        CLOCK_MONOTONIC time the attempt started (comparable with the test process's
        time.monotonic()), outcome the answering backend's NAME or "E:<errno name>" /
        "E:timeout", peer the address the reply came from (the backend for TCP, whose
        connect() went there; the VIP for UDP, reverse-translated) and how long it took.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import socket
import sys
import time


def serve(name: str, port: int) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(128)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    print("ready", flush=True)
    reply = name.encode()
    while True:
        ready, _, _ = select.select([tcp, udp], [], [])
        if tcp in ready:
            conn, _ = tcp.accept()
            with conn, contextlib.suppress(OSError):
                conn.sendall(reply)
        if udp in ready:
            _, peer = udp.recvfrom(2048)
            udp.sendto(reply, peer)


def attempt(ip: str, port: int, proto: str, timeout: float) -> tuple[str, str]:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(timeout)
        try:
            if proto == "tcp":
                sock.connect((ip, port))
                data = b""
                while chunk := sock.recv(64):
                    data += chunk
                peer = sock.getpeername()
            else:
                sock.sendto(b"hello", (ip, port))
                data, peer = sock.recvfrom(2048)
        except TimeoutError:
            return "E:timeout", ""
        except OSError as exc:
            return f"E:{errno.errorcode.get(exc.errno or 0, str(exc.errno))}", ""
    return data.decode(errors="replace") or "E:empty", f"{peer[0]}:{peer[1]}"


def _stdin_closed() -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(ready) and not sys.stdin.buffer.read1(4096)


def client(args: argparse.Namespace) -> None:
    if args.cgroup:
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    n = 0
    while (args.count and n < args.count) or (not args.count and not _stdin_closed()):
        started = time.monotonic()
        outcome, peer = attempt(args.ip, args.port, args.proto, args.timeout)
        line = [started, outcome, peer, time.monotonic() - started]
        print(json.dumps(line), flush=True)
        n += 1
        if args.interval:
            time.sleep(args.interval)  # pacing of the load, not a wait for a condition


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("name")
    s.add_argument("port", type=int)
    c = sub.add_parser("client")
    c.add_argument("ip")
    c.add_argument("port", type=int)
    c.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    c.add_argument("--count", type=int, default=0)
    c.add_argument("--interval", type=float, default=0.0)
    c.add_argument("--timeout", type=float, default=2.0)
    c.add_argument("--cgroup", default="")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.name, args.port)
    else:
        client(args)


if __name__ == "__main__":
    main()
