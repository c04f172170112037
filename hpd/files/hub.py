"""Fail fast when the model hub cannot answer.

Without a network, transformers and datasets retry for about a minute before saying so.
A hub id is first checked against a short connection probe (or HF_HUB_OFFLINE); when the
hub is unreachable, only a cached copy can serve it, and without one the error says why
at once.
"""

from __future__ import annotations

import os
import socket
import threading
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_by_env() -> str:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").upper() in _TRUE:
            return f"{name} is set"
    return ""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _via(url: str) -> str:
    """The URL a connection to `url` really goes to: its proxy when one is set for it."""
    from urllib.request import getproxies, proxy_bypass

    parsed = urlparse(url)
    proxy = getproxies().get(parsed.scheme)
    return proxy if proxy and not proxy_bypass(parsed.hostname or "") else url


@cache
def _probe(url: str, timeout: float) -> str:
    parsed = urlparse(_via(url))
    host, port = parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)
    result = [f"no answer from {host} within {timeout:.0f} s"]

    def connect():  # name resolution can hang past any socket timeout: bound it with a thread
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = ""
        except OSError as e:
            result[0] = f"cannot connect to {host}: {e.strerror or e}"

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return result[0]


def hub_unreachable(timeout: float = PROBE_SECONDS) -> str:
    """'' when the hub answers a connection; otherwise the reason it cannot be used."""
    return offline_by_env() or _probe(endpoint(), timeout)


def cached_snapshot(repo_id: str) -> Path | None:
    """The local cache's copy of a hub model, or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception:  # not cached, a malformed id, or huggingface_hub absent
        return None


def resolve_hub_model(repo_id: str) -> Path | str:
    """The id itself when the hub is reachable; the cached copy when not; else a clear error."""
    reason = hub_unreachable()
    if not reason:
        return repo_id
    cached = cached_snapshot(repo_id)
    if cached is not None:
        return cached
    raise FileNotFoundError(
        f"{repo_id!r} is not a local folder, and the hub is unreachable ({reason}) with no cached "
        "copy; download it where there is a network, or pass a local folder")
