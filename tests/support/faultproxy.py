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
  them (no id; the "v30" shape rewrites them as it does the server's own), and the other lines
  get Typesense's real results, in order.
- `garble_lines`: an import only; forward, then drop the last result line (a short answer).
- `resource_error`: the server is out of `resource` (OUT_OF_DISK or OUT_OF_MEMORY): a write other
  than a DELETE is answered 422 "Rejecting write: running out of resource type: OUT_OF_DISK"
  without forwarding (raft_server.cpp, 0.24.1 and 30 alike); `/health` still answers ok, and in
  the "v30" shape names the `resource_error` (core_api.cpp get_health, since 26). Reads pass.
- `export_error_line`: an export only; forward, then put the plain-text line v30 writes when it
  cannot look a document up mid-export ("Error while getting seq_id of `5`: Not found.",
  core_api.cpp get_export_documents) in place of the line of the document whose id is in `ids`
  (the first line when `ids` is empty). A healthy server writes none, hence a fault.

Shapes. `FaultProxy(url, shape="v30")` rewrites the answers of the 0.24.1 server that Typesense
29 and 30 give in another shape, as read in github.com/typesense/typesense at tags v0.24.1,
v26.0, v27.0, v28.0, v29.0 and the v30 branch (4a092b04, 2025-09-26): src/core_api.cpp,
src/collection.cpp, src/collection_manager.cpp, src/raft_server.cpp, src/http_data.cpp,
include/field.h. (Since which version each one holds is given in brackets.) Search answers and
everything else pass as 0.24.1 writes them.
- a 404 for a missing collection or alias (0.24.1: "Not Found", or "Not found." from a search)
  says "Collection not found" (29+: core_api.cpp `set_404("Collection not found")` in every
  handler, collection_manager.cpp do_search). The other 404s are worded alike in both: "Could not
  find a document with id: 7", "No collection with name `x` found.", "Could not find a filter
  field named `x` in the schema.".
- a failed import line keeps its `document` only when the import asked `return_doc=true` (28+)
  and carries the document's `id` when it asked `return_id=true` (27+; collection.cpp
  add_many's results); outbox-sync asks neither, so its failed lines are
  `{"code":400,"error":"...","success":false}`.
- a collection (GET, POST, DELETE, and each of GET /collections) gains what
  Collection::get_summary_json writes in 30: per field `stem` false (26+), `store` true (27+),
  `stem_dictionary` "" (28+) (`range_index`, a field's own `token_separators` and
  `symbols_to_index` only when set, which outbox-sync never does), and at the top
  `synonym_sets` [] and `curation_sets` [] (30).
- `DELETE /collections/c/documents/7?ignore_not_found=true` of a missing document answers 200
  `{"id":"7"}` (26+, core_api.cpp del_remove_document); 0.24.1 ignores the parameter and
  answers 404.
- `/health` answers `{"ok":true}` as 0.24.1 does, with `resource_error` under that fault.
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
from urllib.parse import parse_qs, unquote, urlsplit

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
    "resource_error",
    "export_error_line",
)
# The answers the proxy gives: the upstream's own (0.24.1), or rewritten into 29/30's.
SHAPES = ("0.24.1", "v30")
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
    resource: str = "OUT_OF_DISK"

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
        if self.kind == "export_error_line" and "/documents/export" not in path:
            return False
        return self.path in path


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    fault: str | None  # the fault kind applied, None when forwarded untouched
    status: int | None  # what the client was answered (None: no answer)


class FaultProxy:
    def __init__(
        self, upstream: str, *, shape: str = "0.24.1", host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
        self.upstream = upstream.rstrip("/")
        self.shape = shape
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

    def http_version(self, version: str) -> None:
        """Answer as this HTTP version: "HTTP/1.0" closes each connection after its answer."""
        self._server.RequestHandlerClass.protocol_version = version  # type: ignore[attr-defined]

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
        # stop() waits up to one poll interval: 0.5 s by default, at the end of every test
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True
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
                if (
                    fault is not None
                    and fault.kind == "resource_error"
                    and _refused_write(method, path)
                ):
                    message = f"Rejecting write: running out of resource type: {fault.resource}"
                    proxy._log(method, path, fault, 422)
                    answer = json.dumps({"message": message}).encode()
                    self._answer(422, {"Content-Type": "application/json"}, answer)
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
                if proxy.shape == "v30":
                    status, answer = reshape_v30(method, path, status, answer)
                    if fault is not None and fault.kind == "resource_error" and _is_health(path):
                        answer = _compact(json.loads(answer) | {"resource_error": fault.resource})
                if fault is not None and fault.kind == "garble_lines":
                    answer = b"\n".join(answer.split(b"\n")[:-1])
                if fault is not None and fault.kind == "export_error_line":
                    answer = _export_error_line(answer, fault.ids)
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
    except (ValueError, AttributeError):
        return None
    return None if value is None else str(value)


def reshape_v30(method: str, path: str, status: int, answer: bytes) -> tuple[int, bytes]:
    """0.24.1's answer to a request as Typesense 29/30 gives it (the module's "Shapes")."""
    url = urlsplit(path)
    parts = url.path.strip("/").split("/")
    query = parse_qs(url.query)
    if status == 404 and parts[0] in ("collections", "aliases"):
        message = _message(answer)
        if message in ("Not Found", "Not found."):  # 0.24.1: the collection or alias is missing
            return 404, _compact({"message": "Collection not found"})
        if (
            method == "DELETE"
            and len(parts) == 4
            and parts[2] == "documents"
            and query.get("ignore_not_found") == ["true"]
            and message.startswith("Could not find a document with id")
        ):
            return 200, _compact({"id": unquote(parts[3])})
        return status, answer
    if status in (200, 201) and parts[0] == "collections" and len(parts) <= 2 and method != "PATCH":
        summaries = json.loads(answer)
        for summary in summaries if isinstance(summaries, list) else [summaries]:
            summary.update(synonym_sets=[], curation_sets=[])
            for declared in summary["fields"]:
                declared.update(stem=False, store=True, stem_dictionary="")
        return status, _compact(summaries)
    if status == 200 and parts[2:] == ["documents", "import"]:
        lines = [_import_line_v30(line, query) for line in answer.split(b"\n") if line.strip()]
        return status, b"\n".join(lines)
    return status, answer


def _import_line_v30(line: bytes, query: dict[str, list[str]]) -> bytes:
    result = json.loads(line)
    if result.get("success"):
        return line  # as 0.24.1 wrote it, `id` included when asked
    document = result.pop("document", "")
    if query.get("return_doc") == ["true"]:
        result["document"] = document
    if query.get("return_id") == ["true"] and (sent := _document_id(document.encode())):
        result["id"] = sent
    return _compact(result)


def _export_error_line(answer: bytes, ids: set[str]) -> bytes:
    lines = answer.split(b"\n")
    position = next((i for i, line in enumerate(lines) if _document_id(line) in ids), 0)
    doc_id = _document_id(lines[position])
    lines[position] = f"Error while getting seq_id of `{doc_id}`: Not found.".encode()
    return b"\n".join(lines)


def _refused_write(method: str, path: str) -> bool:
    """Whether a server out of resources refuses this request (raft_server.cpp)."""
    return method in ("POST", "PUT", "PATCH") and not _is_health(path) and path != "/config"


def _is_health(path: str) -> bool:
    return urlsplit(path).path == "/health"


def _message(answer: bytes) -> str:
    try:
        return str(json.loads(answer).get("message", ""))
    except (ValueError, AttributeError):
        return ""


def _compact(value: Any) -> bytes:
    """JSON as Typesense writes it (nlohmann's dump(): no spaces, keys sorted)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def _status_message(status: int) -> str:
    return {503: "Not Ready or Lagging", 500: "Internal Server Error"}.get(status, "injected")


@contextlib.contextmanager
def fault_proxy(upstream: str, shape: str = "0.24.1") -> Iterator[FaultProxy]:
    with FaultProxy(upstream, shape=shape) as proxy:
        yield proxy
