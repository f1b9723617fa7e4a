"""A fault-injecting HTTP proxy on loopback, between the daemon and a real Typesense.

    with FaultProxy(typesense_url) as proxy:
        index = TypesenseIndex([proxy.url], key, collection)
        proxy.add(Fault("status", status=503))           # the next request: 503, not forwarded
        proxy.add(Fault("drop_response", path="/import"))  # forwarded (applied!), no answer
        proxy.add(Fault("fail_lines", ids={"3"}, status=400, times=2))

Faults are consumed in the order they were added: each request takes the first fault that
matches it and has uses left (`times`; None = every matching request). Requests no fault matches
are forwarded untouched. Every request is logged in `proxy.requests`.

Kinds:
- `status`: answer `status` (e.g. 503 "Not Ready or Lagging") without forwarding.
- `delay`: forward at once (Typesense applies it), hold the answer `seconds` (past the client
  timeout), then send it, if the client still listens.
- `stall`: hold the request `seconds`, then close the connection; never forwarded.
- `drop_request`: read the headers and half the body, close the connection (reset); never
  forwarded.
- `drop_response`: forward, read Typesense's whole answer (so the change is applied), close the
  connection without a byte of answer: the classic "did it happen?" case.
- `truncate_response`: forward, send the status line, the headers and half the body, close.
- `fail_lines`: an import only. The lines whose document id is in `ids` (or whose position is
  in `positions`) are not forwarded; their result lines say
  `{"success":false,"code":status,"error":...,"document":...}` as Typesense 0.24.1 writes
  them (no id), and the other lines get Typesense's real results, in order.
- `garble_lines`: an import only; forward, then drop the last result line (a short answer).
"""

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

KINDS = (
    "status",
    "delay",
    "stall",
    "drop_request",
    "drop_response",
    "truncate_response",
    "fail_lines",
    "garble_lines",
)
# Headers that describe one hop, not the message: never copied across the proxy.
HOP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "accept-encoding",
    "content-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}


@dataclass
class Fault:
    kind: str
    path: str = ""  # a substring of the request path (with its query) to match; "" = any
    method: str = ""  # e.g. "POST"; "" = any
    times: int | None = 1  # uses left; None = unlimited
    status: int = 503
    seconds: float = 1.0
    ids: set[str] = field(default_factory=set)
    positions: set[int] = field(default_factory=set)
    error: str = "injected by the fault proxy"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method and self.method != method:
            return False
        if self.kind in ("fail_lines", "garble_lines") and "/documents/import" not in path:
            return False
        return self.path in path


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    fault: str | None  # the fault kind applied, None when forwarded untouched
    status: int | None  # what the client was answered (None: no answer)


class FaultProxy:
    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=120)
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- control --------------------------------------------------------------------------------

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        """No more faults; forget the request log."""
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return [f for f in self.faults if f.times is None or f.times > 0]

    def applied(self, kind: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.fault and (kind is None or r.fault == kind)]

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- the proxy ------------------------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def _log(self, method: str, path: str, fault: Fault | None, status: int | None) -> None:
        with self._lock:
            self.requests.append(Request(method, path, fault.kind if fault else None, status))

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> httpx.Response:
        return self._client.request(
            method,
            self.upstream + path,
            headers={k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}
            | {"Accept-Encoding": "identity"},
            content=body,
        )

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real server does

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._handle()

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

            def _handle(self) -> None:
                method, path = self.command, self.path
                fault = proxy._take_fault(method, path)
                length = int(self.headers.get("Content-Length") or 0)
                headers = dict(self.headers.items())
                if fault is not None and fault.kind == "drop_request":
                    self.rfile.read(length // 2)
                    proxy._log(method, path, fault, None)
                    self._reset()
                    return
                body = self._read_body(length)
                if fault is not None and fault.kind == "stall":
                    time.sleep(fault.seconds)
                    proxy._log(method, path, fault, None)
                    self._reset()
                    return
                if fault is not None and fault.kind == "status":
                    answer = json.dumps({"message": _status_message(fault.status)}).encode()
                    proxy._log(method, path, fault, fault.status)
                    self._answer(fault.status, {"Content-Type": "application/json"}, answer)
                    return
                if fault is not None and fault.kind == "fail_lines":
                    status, response_headers, answer = self._fail_lines(fault, path, headers, body)
                else:
                    try:
                        response = proxy._forward(method, path, headers, body)
                    except httpx.HTTPError:
                        proxy._log(method, path, fault, None)
                        self._reset()  # Typesense is down: so is the proxy's answer
                        return
                    status, answer = response.status_code, response.content
                    response_headers = {
                        k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS
                    }
                if fault is not None and fault.kind == "garble_lines":
                    answer = b"\n".join(answer.split(b"\n")[:-1])
                if fault is not None and fault.kind == "drop_response":
                    proxy._log(method, path, fault, None)
                    self._reset()
                    return
                if fault is not None and fault.kind == "truncate_response":
                    proxy._log(method, path, fault, None)
                    self._answer(status, response_headers, answer, cut=max(1, len(answer) // 2))
                    self._reset()
                    return
                if fault is not None and fault.kind == "delay":
                    time.sleep(fault.seconds)
                proxy._log(method, path, fault, status)
                self._answer(status, response_headers, answer)

            def _read_body(self, length: int) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(length)

            def _fail_lines(
                self, fault: Fault, path: str, headers: dict[str, str], body: bytes
            ) -> tuple[int, dict[str, str], bytes]:
                lines = [line for line in body.split(b"\n") if line.strip()]
                failed = {
                    position
                    for position, line in enumerate(lines)
                    if position in fault.positions or _document_id(line) in fault.ids
                }
                kept = [line for position, line in enumerate(lines) if position not in failed]
                upstream: list[bytes] = []
                status, response_headers = 200, {"Content-Type": "application/json"}
                if kept:
                    response = proxy._forward("POST", path, headers, b"\n".join(kept))
                    if response.status_code != 200:
                        return response.status_code, response_headers, response.content
                    upstream = [x for x in response.content.split(b"\n") if x.strip()]
                results = iter(upstream)
                answer = []
                for position, line in enumerate(lines):
                    if position in failed:
                        verdict = {
                            "code": fault.status,
                            "document": line.decode(),
                            "error": fault.error,
                            "success": False,
                        }
                        answer.append(json.dumps(verdict, ensure_ascii=False).encode())
                    else:
                        answer.append(next(results))
                return status, response_headers, b"\n".join(answer)

            def _answer(
                self, status: int, headers: dict[str, str], body: bytes, cut: int | None = None
            ) -> None:
                with contextlib.suppress(OSError):  # the client may have given up already
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body if cut is None else body[:cut])
                    self.wfile.flush()

            def _reset(self) -> None:
                """Close the connection at once, with a TCP reset rather than a polite FIN."""
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.shutdown(socket.SHUT_RDWR)

        return Handler


def _document_id(line: bytes) -> str | None:
    try:
        value = json.loads(line).get("id")
    except ValueError:
        return None
    return None if value is None else str(value)


def _status_message(status: int) -> str:
    return {503: "Not Ready or Lagging", 500: "Internal Server Error"}.get(status, "injected")


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream) as proxy:
        yield proxy
