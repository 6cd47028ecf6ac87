"""Decide quickly whether the network services a run uses (HF hub, W&B) can be reached,
so that no run waits on the network."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def hub_offline_requested() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.cache
def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """True when the host of ``url`` accepts a TCP connection within ``timeout`` seconds."""
    parsed = urlparse(url if "//" in url else f"https://{url}")
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """True when offline mode is off and the hub answers within a few seconds.

    When the hub cannot be reached, the offline flags are set for this process so that
    `datasets` and `huggingface_hub` fail at once instead of retrying for tens of seconds.
    """
    if hub_offline_requested():
        return False
    if host_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        return True
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    return False
