"""What a running process holds and uses, read from ``/proc`` (Linux): its TCP connections to
a port and the CPU time of its threads. The benchmarks and the tests measure agents with it."""

from __future__ import annotations

from pathlib import Path

__all__ = ("connections", "established_to", "running_ms", "socket_inodes")

#: The state of an ESTABLISHED connection in ``/proc/net/tcp``.
_ESTABLISHED = "01"


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def established_to(pid: int, port: int) -> set[int]:
    """Inodes of the ESTABLISHED TCP connections to remote ``port`` in the network namespace of
    process ``pid`` (``/proc/<pid>/net/tcp`` and ``tcp6``), whichever process holds them."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], int(fields[9])
            if state == _ESTABLISHED and int(remote.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def connections(pid: int, port: int) -> int:
    """The TCP connections process ``pid`` holds to remote ``port``."""
    return len(socket_inodes(pid) & established_to(pid, port))


def running_ms(pid: int) -> float:
    """CPU time of the live threads of process ``pid``, in ms at ns resolution (the first field
    of each ``/proc/<pid>/task/<tid>/schedstat``). ``/proc/<pid>/stat`` counts whole 10 ms
    ticks, too coarse for an idle process, but also counts threads that have ended."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # the thread ended since the listing
            continue
    return total / 1e6
