"""Free ports for `server.<port>=0`, the tests and the benchmarks (no torch: the benchmarks' drivers import it too)."""

import random
import socket

FIRST = 20000  # below Linux's ephemeral range, above the well-known and most registered services' ports
EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
LAST = 32768  # the ephemeral range's usual start, where /proc does not say


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, below the kernel's ephemeral range: a port the kernel hands out for outgoing
    connections (gloo, clients) may be taken again before the server that asked binds it, and Triton binds its
    ports well after they are chosen. Where that range leaves no room: any free port."""
    try:
        with open(EPHEMERAL_RANGE) as f:
            last = min(int(f.read().split()[0]), LAST)
    except (OSError, ValueError, IndexError):
        last = LAST
    for _ in range(1000) if last > FIRST else ():
        port = random.randrange(FIRST, last)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
                return port
            except OSError:
                continue
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
