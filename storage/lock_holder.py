"""Who holds a lock or a claim: the record's host and pid, and whether that process is gone."""

from __future__ import annotations

import os
import socket


def holder_gone(rec: dict) -> bool:
    """True when the record's holder was a process on this host that no longer exists (a holder
    on another host is judged by its heartbeat's age instead)."""
    if rec.get("host") != socket.gethostname() or not rec.get("pid"):
        return False
    try:
        os.kill(int(rec["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False
