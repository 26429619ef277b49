"""Who holds a lock or a claim: the record's host, pid and host identity, and whether that process
is gone.

A pid means something only in its own PID namespace: two containers with host networking share a
host name, each with its own pids. So a record names its holder's `hostid` (host name, boot id and
PID namespace) and a holder is asked for by pid only from the same `hostid`; any other holder (on
another host, in another container, or a record without `hostid`) is judged by its heartbeat's age.
"""

from __future__ import annotations

import functools
import os
import socket


@functools.cache
def _namespace() -> str | None:
    """This kernel boot and PID namespace, or None where they cannot be read (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/pidns:{ns.st_dev}:{ns.st_ino}"


def host_id() -> str | None:
    """Where this process's pid means what it says: host name, boot id and PID namespace (None
    where unknown: then no holder is judged by its pid)."""
    ns = _namespace()
    return f"{socket.gethostname()}/{ns}" if ns else None


def holder_fields() -> dict:
    """The fields a lock or claim record carries to name its holder."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "hostid": host_id()}


def holder_gone(rec: dict) -> bool:
    """True when the record's holder was a process of this host, boot and PID namespace that no
    longer exists (any other holder is judged by its heartbeat's age instead)."""
    me = host_id()
    if me is None or rec.get("hostid") != me or not rec.get("pid"):
        return False
    try:
        os.kill(int(rec["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False
