"""Which hosts are loopback: the question the registry, the worker and the dashboard each ask of the
address they listen on before they agree to run without tokens."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for loopback names and addresses (``localhost``, ``127.0.0.1``, ``[::1]``; "" as well)."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
