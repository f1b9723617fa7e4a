"""The Typesense side on its own: the one place that tells server trouble (retry later) from a
refused request (give up), what a 404 means, and the parsing of URLs and JSONL answers. The
classification is checked on exceptions made here and, where the server decides, against the
real 0.24.1 server (through the fault proxy for answers it will not give at will)."""

import gc
import http.server
import json
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import certifi
import httpx
import pytest
from structlog.testing import capture_logs
from typesense import exceptions as ts

from outbox_sync import typesense_index
from outbox_sync.errors import (
    CollectionNotFoundError,
    ConfigError,
    NotFoundError,
    TypesenseError,
    TypesenseRejectedError,
    TypesenseUnavailableError,
)
from outbox_sync.localserver import free_port
from outbox_sync.typesense_index import (
    MAX_DELETE_IDS,
    MAX_FILTER_URL_CHARS,
    ImportResult,
    TypesenseIndex,
    _lines,
    classify,
    free_request_bodies,
    id_filters,
    parse_line,
    parse_node,
    split_lines,
    status_error,
)
from outbox_sync.values import MAX_ID_BYTES
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.typesense import Server, by_hand, export

# -- classify and status_error -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "collection", "expected"),
    [
        (500, "Internal Server Error", None, TypesenseUnavailableError),
        (502, "Bad Gateway", "c", TypesenseUnavailableError),
        (503, "Not Ready or Lagging", "c", TypesenseUnavailableError),
        (
            422,
            "Rejecting write: running out of resource type: OUT_OF_DISK",
            None,
            TypesenseUnavailableError,
        ),
        (422, "Field `comment` must be a string.", None, TypesenseRejectedError),
        (422, "Field `resource` must be a string.", None, TypesenseRejectedError),
        (400, "Bad JSON.", "c", TypesenseRejectedError),
        (409, "A collection with name `c` already exists.", None, TypesenseRejectedError),
        (
            401,
            "Forbidden - a valid x-typesense-api-key header must be sent.",
            "c",
            TypesenseRejectedError,
        ),
        (403, "Forbidden", "c", TypesenseRejectedError),
        (404, "Not Found", "c", CollectionNotFoundError),
        (404, "Collection not found", "c", CollectionNotFoundError),
        (404, "Not Found", None, NotFoundError),
        (404, "Could not find a filter field named `x` in the schema.", None, NotFoundError),
    ],
)
def test_status_error_decides_by_status_alone(
    status: int, message: str, collection: str | None, expected: type[TypesenseError]
) -> None:
    error = status_error(status, message, collection)
    assert type(error) is expected
    assert (error.http_status, error.reason) == (status, message)


def test_status_errors_say_what_to_do() -> None:
    assert "refused the API key (401): check TYPESENSE_API_KEY" in str(
        status_error(401, "Forbidden", None)
    )
    missing = status_error(404, "Not Found", "sequences")
    assert isinstance(missing, CollectionNotFoundError) and missing.collection == "sequences"
    assert str(missing) == "Typesense collection 'sequences' does not exist (404: Not Found)"
    assert str(status_error(503, "Not Ready or Lagging", None)) == (
        "Typesense answered 503: Not Ready or Lagging"
    )


def certificate_failure() -> httpx.ConnectError:
    """A certificate that did not verify, as httpx reports it: its ConnectError, caused by the
    ssl error."""
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "self-signed certificate"
    try:
        raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]") from cause
    except httpx.ConnectError as error:
        return error


@pytest.mark.parametrize(
    ("error", "expected", "words"),
    [
        (httpx.ConnectError("refused"), TypesenseUnavailableError, "unreachable: ConnectError"),
        (httpx.ReadTimeout("slow"), TypesenseUnavailableError, "unreachable: ReadTimeout"),
        (httpx.RemoteProtocolError("cut"), TypesenseUnavailableError, "unreachable"),
        (ts.Timeout("t"), TypesenseUnavailableError, "unreachable: Timeout"),
        (ts.HTTPStatus0Error("0"), TypesenseUnavailableError, "unreachable"),
        (ts.ServiceUnavailable(503, "Not Ready or Lagging"), TypesenseUnavailableError, "503"),
        (ts.ServerError(500, "boom"), TypesenseUnavailableError, "answered 500: boom"),
        (ts.RequestUnauthorized(401, "no"), TypesenseRejectedError, "refused the API key"),
        (ts.RequestMalformed(400, "Bad JSON."), TypesenseRejectedError, "answered 400"),
        (ts.ObjectNotFound(404, "Not Found"), NotFoundError, "answered 404: Not Found"),
        (ts.TypesenseClientError("not JSON"), TypesenseUnavailableError, "broken response"),
        (certificate_failure(), TypesenseRejectedError, "self-signed certificate"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_classify_maps_client_and_transport_errors(
    error: Exception, expected: type[TypesenseError], words: str
) -> None:
    classified = classify(error, None)
    assert type(classified) is expected
    assert words in str(classified)


def test_classify_a_404_about_the_collection_and_what_is_not_ours() -> None:
    missing = classify(ts.ObjectNotFound(404, "Not Found"), "sequences")
    assert type(missing) is CollectionNotFoundError
    ours = TypesenseRejectedError("already ours")
    assert classify(ours, "sequences") is ours
    foreign = KeyError("x")
    assert classify(foreign, None) is foreign  # not ours to decide: passes through
    assert "--ca-file" in str(classify(certificate_failure(), None))


# -- against the real server -------------------------------------------------------------------


@pytest.mark.answer_shapes
def test_a_404_of_a_search_is_a_missing_collection_only_when_it_is_missing(
    index: TypesenseIndex, typesense_server: Server
) -> None:
    # 0.24.1 answers an unknown filter field with 404: a refused search, not a missing collection
    with pytest.raises(NotFoundError) as caught:
        index.search({"q": "*", "filter_by": "nofield:=3"})
    assert type(caught.value) is NotFoundError
    assert "Could not find a filter field named `nofield`" in caught.value.reason
    by_hand(typesense_server, "DELETE", f"/collections/{index.target()}")
    with pytest.raises(CollectionNotFoundError):
        index.search({"q": "*", "filter_by": "nofield:=3"})


@pytest.mark.answer_shapes
def test_a_missing_document_is_none_or_false_a_missing_collection_is_an_error(
    index: TypesenseIndex, typesense_server: Server, answer_shape: str
) -> None:
    document = {
        "id": "a/b c",  # any id: retrieve and delete_document escape it
        "element_type": "script",
        "element_id": 1,
        "sequence_number": 1,
        "created_at": "x",
    }
    by_hand(typesense_server, "POST", f"/collections/{index.collection}/documents", json=document)
    assert index.retrieve("a/b c") == document
    assert index.retrieve("404") is None
    assert index.delete_document("404") is False
    assert index.delete_document("a/b c") is True
    assert index.retrieve("a/b c") is None

    missing = index.on_collection(f"{index.collection}_missing")
    with pytest.raises(CollectionNotFoundError, match="_missing' does not exist") as caught:
        missing.retrieve("1")
    # decided by the status and a lookup of the collection, whatever the server's words
    assert (
        caught.value.reason == {"0.24.1": "Not Found", "v30": "Collection not found"}[answer_shape]
    )
    with pytest.raises(CollectionNotFoundError):
        missing.delete_document("1")
    with pytest.raises(CollectionNotFoundError):
        missing.info()
    with pytest.raises(CollectionNotFoundError):
        list(missing.export_documents())
    assert missing.target() is None


def test_split_lines_cuts_between_lines_within_the_limit() -> None:
    body = b"\n".join([b"a" * 3, b"b" * 4, b"c" * 12, b"d", b"e" * 2])
    assert next(split_lines(body, len(body))) is body  # short enough: no copy
    parts = list(split_lines(body, 9))
    assert parts == [b"aaa\nbbbb", b"c" * 12, b"d\nee"]  # a line over the limit goes alone
    assert list(split_lines(b"x" * 20, 9)) == [b"x" * 20]
    assert list(split_lines(b"abc\n" + b"x" * 20, 9)) == [b"abc", b"x" * 20]


def test_a_body_over_the_limit_is_imported_in_parts(
    index: TypesenseIndex, typesense_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request carries at most IMPORT_MAX_BYTES (but a line longer than that, alone),
    cut between lines: every line is sent once, in order, and has its verdict."""
    monkeypatch.setattr(typesense_index, "IMPORT_MAX_BYTES", 1000)
    line = '{"id":"%d","element_type":"a","element_id":1,"sequence_number":1,"created_at":"x",'
    lines = [(line % i + '"comment":"%s"}' % ("w " * (i * 7 % 200))).encode() for i in range(60)]
    lines[30] = (line % 30 + '"comment":"%s"}' % ("long " * 500)).encode()
    body = b"\n".join(lines)
    sent: list[bytes] = []
    imported = index.writes.import_
    monkeypatch.setattr(
        index.writes, "import_", lambda part, params: sent.append(part) or imported(part, params)
    )
    assert index.import_jsonl(body, len(lines)) == [ImportResult(True)] * len(lines)
    assert b"\n".join(sent) == body and len(sent) > 5
    assert [len(part) for part in sent if len(part) > 1000] == [len(lines[30])]
    assert sorted(map(int, export(typesense_server, index.collection))) == list(range(60))


# Ids a filter value of 0.24.1 reads as another (the spaces around it dropped, a backslash
# escaping what follows it, a backtick), each beside the id it would be read as, and ids it
# reads right.
MISREAD = {" a": "a", "b ": "b", "\tc\n": "c", "d\\": "d", "\\": "", "e\\`f": "e`f"}
READ_RIGHT = ("7", "-7", "x y", "t\tab", "q,r", "ünï")


def test_every_id_is_deleted_and_exported_as_itself(
    index: TypesenseIndex, typesense_server: Server
) -> None:
    ids = [*MISREAD, *(neighbour for neighbour in MISREAD.values() if neighbour), *READ_RIGHT]
    line = '{"id":%s,"element_type":"a","element_id":1,"sequence_number":1,"created_at":"x"}'
    body = "\n".join(line % json.dumps(doc_id) for doc_id in ids).encode()
    assert all(result.ok for result in index.import_jsonl(body, len(ids)))
    asked = [*MISREAD, *READ_RIGHT]
    assert sorted(document["id"] for document in index.export_ids(asked)) == sorted(asked)
    assert index.delete_ids(asked) == len(asked)
    assert sorted(export(typesense_server, index.collection)) == sorted(
        neighbour for neighbour in MISREAD.values() if neighbour
    )


# Ids of ~90 bytes, as URLs as keys make them, two in three with a character percent-encoding
# writes in 6 (ü), and the longest ids the mapping lets through, which take ~3 KiB in a URL
# each: no filter holds two of them.
LONG_ID = "https://example.com/{}ber/2024/11/articles/a-slug-as-long-as-the-slugs-of-urls-{:06d}-in"
LONG_IDS = [LONG_ID.format("ü" if i % 3 else "u", i) for i in range(1500)]
LONGEST_IDS = ["ü" * (MAX_ID_BYTES // 2), "€" * (MAX_ID_BYTES // 3), "%" * MAX_ID_BYTES]


def test_ids_no_one_url_holds_are_all_deleted_and_exported(
    index: TypesenseIndex, typesense_server: Server
) -> None:
    # 1,000 of them in one filter made a ~115 KB query: httpx refused it (InvalidURL)
    asked = [*LONG_IDS, *LONGEST_IDS]
    line = '{"id":%s,"element_type":"a","element_id":1,"sequence_number":1,"created_at":"x"}'
    body = "\n".join(line % json.dumps(doc_id) for doc_id in [*asked, "kept"]).encode()
    assert all(result.ok for result in index.import_jsonl(body, len(asked) + 1))
    assert sorted(document["id"] for document in index.export_ids(asked)) == sorted(asked)
    assert index.delete_ids(asked) == len(asked)
    assert sorted(export(typesense_server, index.collection)) == ["kept"]


def test_filters_of_ids_list_each_id_once_in_order_within_the_url_budget() -> None:
    ids = [*LONG_IDS, *LONGEST_IDS, *(str(i % 10) for i in range(2500))]
    filters = list(id_filters(ids))
    listed = [value.strip("`") for f in filters for value in f[len("id:[") : -1].split(",")]
    assert listed == ids
    # as httpx writes the query
    in_url = [len(str(httpx.QueryParams({"filter_by": f}))) - len("filter_by=") for f in filters]
    assert max(in_url) <= MAX_FILTER_URL_CHARS
    counts = [f.count(",") + 1 for f in filters]
    assert max(counts) == MAX_DELETE_IDS  # the short ids: bounded by their count
    assert len(filters) > 20  # the long ones by their length (by count alone: 2 filters)


def test_a_wrong_key_is_refused_and_an_unreachable_server_is_server_trouble(
    typesense_server: Server, collection: str
) -> None:
    wrong = TypesenseIndex([typesense_server.url], "wrong-key", collection)
    with pytest.raises(TypesenseRejectedError, match=r"refused the API key \(401\)"):
        wrong.retrieve("1")
    with pytest.raises(TypesenseRejectedError, match=r"refused the API key \(401\)"):
        list(wrong.export_documents())
    nobody = TypesenseIndex([f"http://127.0.0.1:{free_port()}"], "k", collection, timeout_s=2)
    with pytest.raises(TypesenseUnavailableError, match="unreachable"):
        nobody.info()
    with pytest.raises(TypesenseUnavailableError, match="unreachable"):
        list(nobody.export_documents())
    assert nobody.health_problem() is not None


@pytest.fixture
def proxied(
    typesense_server: Server, index: TypesenseIndex
) -> Iterator[tuple[FaultProxy, TypesenseIndex]]:
    with FaultProxy(typesense_server.url) as proxy:
        yield proxy, TypesenseIndex([proxy.url], typesense_server.api_key, index.collection)


@pytest.mark.parametrize("status", [500, 503])
def test_a_5xx_answer_is_server_trouble_on_every_path(
    proxied: tuple[FaultProxy, TypesenseIndex], status: int
) -> None:
    proxy, index = proxied
    outcomes: list[tuple[str, str]] = []
    index.observe = lambda operation, outcome, _: outcomes.append((operation, outcome))
    proxy.add(Fault("status", status=status, times=None))
    with pytest.raises(TypesenseUnavailableError, match=f"answered {status}") as caught:
        index.search({"q": "*"})
    assert caught.value.http_status == status
    with pytest.raises(TypesenseUnavailableError, match=f"answered {status}"):
        index.retrieve("1")
    with pytest.raises(TypesenseUnavailableError, match=f"answered {status}"):
        list(index.export_documents())
    with pytest.raises(TypesenseUnavailableError):  # retried once at once, then given up
        index.import_jsonl(b'{"id":"1"}', 1)
    assert (
        outcomes
        == [("search", "unavailable"), ("retrieve", "unavailable")]
        + [("import", "unavailable")] * 2
    )
    assert index.health_problem() is not None


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "node"),
    [
        ("http://127.0.0.1:8108", ("127.0.0.1", 8108, "http", "")),
        ("https://search.example.org", ("search.example.org", 8108, "https", "")),
        (" http://h:1/ ", ("h", 1, "http", "")),
        ("http://h:1/typesense/", ("h", 1, "http", "/typesense")),
        ("http://[::1]:8108", ("::1", 8108, "http", "")),
    ],
)
def test_parse_node(url: str, node: tuple[str, int, str, str]) -> None:
    host, port, protocol, path = node
    assert parse_node(url) == {"host": host, "port": port, "protocol": protocol, "path": path}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://127.0.0.1:8108", "must look like http://127.0.0.1:8108"),
        ("127.0.0.1:8108", "must look like"),
        ("http://", "must look like"),
        ("http://h:1/?x=1", "must not carry"),
        ("http://h:1/#x", "must not carry"),
        ("http://h:99999", "has an invalid port"),
    ],
)
def test_parse_node_refuses_what_is_not_a_node(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^Typesense URL ") as caught:
        parse_node(url)
    assert message in str(caught.value) and repr(url) in str(caught.value)


def test_a_url_with_credentials_is_refused_without_showing_them() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_node("http://user:pass@h:1")
    assert str(caught.value).startswith("Typesense URL 'http://***@h:1' must not carry credentials")
    assert "user" not in str(caught.value) and "pass" not in str(caught.value)


@pytest.mark.parametrize(
    ("urls", "ca_file", "verify"),
    [
        (["http://127.0.0.1:8108"], None, False),  # nothing to verify: no CA bundle loaded
        (["http://a:8108", "HTTPS://b:443"], None, True),
        (["https://b:443"], certifi.where(), "the CA file's"),
    ],
)
def test_certificates_are_verified_wherever_a_node_speaks_tls(
    urls: list[str], ca_file: str | None, verify: object
) -> None:
    index = TypesenseIndex(urls, "key", "c", ca_file=ca_file)
    if ca_file is None:
        assert index.client.config.verify == verify
        return
    context = index.client.config.verify  # loaded once, for every client of the index
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] > 100  # certifi's bundle


def test_parse_line() -> None:
    assert parse_line('{"success":true}', "import response") == {"success": True}
    for bad in ("[1]", "not json", '"text"', ""):
        with pytest.raises(TypesenseUnavailableError, match="sent a broken export line"):
            parse_line(bad, "export line")
    with pytest.raises(TypesenseUnavailableError) as caught:
        parse_line("x" * 1000, "export line")
    assert len(str(caught.value)) < 300  # a long answer is cut


def test_lines_split_on_newlines_only_across_chunks() -> None:
    text = '{"c":"a\u2028b"}\n\n{"c":"p\u2029q\x85r"}\r\n  \n{"c":"é"}'.encode()
    whole = list(_lines(iter([text])))
    assert whole == ['{"c":"a\u2028b"}', '{"c":"p\u2029q\x85r"}\r', '{"c":"é"}']
    # cut anywhere, even inside a character of several bytes: the same lines
    for cut in range(1, len(text)):
        assert list(_lines(iter([text[:cut], text[cut:]]))) == whole
    assert list(_lines(iter([text[i : i + 1] for i in range(len(text))]))) == whole
    assert list(_lines(iter([b"", b"\n", b" "]))) == []


def test_the_bodies_of_answered_imports_are_freed_at_once(index: TypesenseIndex) -> None:
    """Each request leaves a reference cycle holding its body (httpx's request and its stream):
    left to the collector's older generation, a drain's 1M peak RSS grew by a third."""

    def streams() -> int:
        return sum(type(o) is httpx.ByteStream for o in gc.get_objects())

    line = b'{"id":"%d","element_type":"action","element_id":1,"sequence_number":1,'
    line += b'"created_at":"2026-11-30T00:00:00Z"}'
    gc.collect()
    gc.disable()
    try:
        before = streams()
        for request in range(3):
            body = b"\n".join(line % (request * 10 + i) for i in range(10))
            assert all(result.ok for result in index.import_jsonl(body, 10))
        assert streams() > before  # held by cycles, as long as nothing collects them
        free_request_bodies()
        assert streams() == before
    finally:
        gc.enable()


class ClosingHandler(http.server.BaseHTTPRequestHandler):
    """A /health behind something that closes connections: after each answer (HTTP/1.0), or,
    speaking HTTP/1.1 and keep-alive, as soon as the answer is sent (a short idle timeout)."""

    connection_header = ""  # a Connection header to send, if any

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "11")
        if self.connection_header:
            self.send_header("Connection", self.connection_header)
        self.end_headers()
        self.wfile.write(b'{"ok":true}')
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("protocol", ["HTTP/1.0", "HTTP/1.1", "HTTP/1.1, Connection: Close"])
def test_the_restart_watch_turns_itself_off_where_connections_do_not_last(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where every probe needs a new connection (a proxy between), a lost one tells no
    restart: one warning, then the watch of that node is off, not an audit every 5 s. An
    answer that says so (HTTP/1.0, `Connection: Close` in any case) turns it off at once."""
    version, _, header = protocol.partition(", Connection: ")
    monkeypatch.setattr(ClosingHandler, "protocol_version", version)
    monkeypatch.setattr(ClosingHandler, "connection_header", header)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ClosingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    watch = TypesenseIndex([url], "key", "sequences").restart_watch()
    try:
        with capture_logs() as logged:
            looks = [watch.lost(float(now)) for now in range(0, 30, 5)]
    finally:
        watch.close()
        server.shutdown()
        server.server_close()
    # saying so is believed at once; a keep-alive answer is believed once: one audit, then off
    said = protocol != "HTTP/1.1"
    assert looks == [[]] * 6 if said else [[], [url], [], [], [], []]
    [off] = [entry for entry in logged if entry["event"] == "restart_watch_off"]
    assert off["node"] == url and watch.urls == []


class SlowOnceHandler(http.server.BaseHTTPRequestHandler):
    """A /health that keeps its connections, and answers one request too late."""

    protocol_version = "HTTP/1.1"
    slow: ClassVar[list[float]] = []  # seconds the next answers wait
    asked: ClassVar[list[float]] = []  # one per request

    def do_GET(self) -> None:
        self.asked.append(time.monotonic())
        if self.slow:
            time.sleep(self.slow.pop())
        try:
            self.send_response(200)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b'{"ok":true}')
        except (BrokenPipeError, ConnectionResetError):  # the watch gave up on the late answer:
            # said by socketserver on stderr, from a thread that outlives the test, it landed in
            # another test's CliRunner output as a traceback (CI failed twice so)
            pass

    def log_message(self, *args: Any) -> None:
        pass


def test_a_probe_too_slow_for_the_restart_watch_is_no_restart() -> None:
    """A busy server answering a probe after the watch's timeout: httpx drops that connection,
    and the next probe's new one is no sign of a restart (it asked for an audit). The node is
    left alone for 30 s: one that never answers would cost the loop the timeout every 5 s."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowOnceHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    watch = TypesenseIndex([url], "key", "sequences").restart_watch()
    try:
        first = watch.lost(0.0)
        SlowOnceHandler.slow.append(2.0)  # the watch waits 1 s
        looks = [first, watch.lost(5.0), watch.lost(10.0), watch.lost(30.0)]
        asked = len(SlowOnceHandler.asked)
        looks += [watch.lost(40.0), watch.lost(45.0)]
    finally:
        watch.close()
        server.shutdown()
        server.server_close()
    assert looks == [[]] * 6 and watch.urls == [url]
    assert (asked, len(SlowOnceHandler.asked)) == (2, 4)  # none at 10 and 30, again at 40


def test_the_restart_watch_keeps_one_connection_to_a_real_server(
    typesense_server: Server,
) -> None:
    """A real server keeps the watch's connection between probes: no restart is seen. Closed
    when the loop stops, the watch takes the connections of a loop run again as new ones."""
    watch = TypesenseIndex([typesense_server.url], "key", "sequences").restart_watch()
    try:
        looks = [watch.lost(float(now)) for now in range(0, 30, 5)]
        watch.close()
        looks += [watch.lost(float(now)) for now in range(30, 40, 5)]
    finally:
        watch.close()
    assert looks == [[]] * 8 and watch.urls == [typesense_server.url]
