"""The test server's address, and Typesense read or changed by hand, behind the daemon's back."""

import contextlib
import json
import ssl
from dataclasses import dataclass
from typing import Any

import httpx

from outbox_sync.localserver import LocalTypesense
from outbox_sync.mapping import SEQUENCES

API_KEY = "test-key-0f3c9a"


@dataclass
class Server:
    url: str
    api_key: str
    local: LocalTypesense | None = None


def discard(server: LocalTypesense) -> None:
    """Kill the server (SIGKILL), a crash: no snapshot, no graceful exit. Also a teardown's
    stop, when nothing reads the data again (stop() costs ~2 s)."""
    if server.process is not None:
        server.process.kill()
        server.process.wait()
        server.process = None


def healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        return bool(httpx.get(f"{url}/health", timeout=1).json().get("ok"))
    return False


def by_hand(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to Typesense, as someone with curl would send it."""
    response = httpx.request(
        method,
        f"{server.url}{path}",
        headers={"X-TYPESENSE-API-KEY": server.api_key},
        timeout=10,
        **kwargs,
    )
    response.raise_for_status()
    return response


def export(
    server: Server, collection: str, *, timeout_s: float = 60, verify: ssl.SSLContext | bool = True
) -> dict[str, dict[str, Any]]:
    """Every document of the collection, by id (`verify`: the CA of an https server)."""
    response = httpx.get(
        f"{server.url}/collections/{collection}/documents/export",
        headers={"X-TYPESENSE-API-KEY": server.api_key},
        timeout=timeout_s,
        verify=verify,
    )
    response.raise_for_status()
    documents = [json.loads(line) for line in response.text.split("\n") if line.strip()]
    return {document["id"]: document for document in documents}


def refusing_collection(server: Server, name: str) -> None:
    """A collection that refuses every document with a comment (HTTP 400): `comment` is int32
    there, as after a broken migration."""
    schema = SEQUENCES.collection_schema(name)
    for field in schema["fields"]:
        if field["name"] == "comment":
            field["type"] = "int32"
    by_hand(server, "POST", "/collections", json=schema)
