"""Can an optional download happen? One bounded network probe for datasets and hub weights.

Downloads are optional in enspipe (DESIGN §5): offline they must fail at once with a clear
message, not after a library's retries. Both `data` (MNIST, CIFAR-10) and `models`
(pretrained weights) ask here first.
"""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["download_blocker", "network_available"]


def network_available(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    """Can we open a TCP connection to host? Bounded by `timeout` even if DNS hangs."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    # create_connection's timeout does not cover the DNS lookup, which can hang far
    # longer on a machine without network: the probe runs in a daemon thread we stop
    # waiting for.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def download_blocker(root: Path, host: str,
                     probe: Callable[[str], bool] | None = None) -> str | None:
    """Why files cannot be downloaded from host into root, or None if they can.
    `probe` answers whether host is reachable (default: `network_available`)."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        return f"{existing} is read-only, so they cannot be downloaded there"
    if not (probe or network_available)(host):
        return "no network to download them"
    return None
