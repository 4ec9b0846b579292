"""A Ray address as the user gives it, checked before Ray is asked to join it."""

from __future__ import annotations

import socket

from pipeline.errors import UserError

CONNECT_TIMEOUT_S = 5.0


def reachable(address: str, flag: str = "--cluster") -> None:
    """Fail fast, with the fix, when nothing listens at a host:port address (given with `flag`)."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{flag} {address!r}: give 'auto' or a Ray address HOST:PORT (e.g. 127.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise UserError(
            f"{flag} {address}: cannot reach a Ray cluster there ({err.strerror or err}); start one with "
            f"`ray start --head` on that machine, check the address and port, or use {flag} auto"
        ) from None
