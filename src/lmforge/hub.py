"""Decide quickly whether the Hugging Face hub can be used, so that no run waits on the network."""

from __future__ import annotations

import functools
import os
import socket

_TRUE = {"1", "true", "yes", "on"}


def hub_offline_requested() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.cache
def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when offline mode is off and the hub answers a TCP connection within ``timeout`` seconds.

    When the hub cannot be reached, the offline flags are set for this process so that
    `datasets` and `huggingface_hub` fail at once instead of retrying for tens of seconds.
    """
    if hub_offline_requested():
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return False
