"""The Typesense side: the collection, batched upserts and deletes, the streamed export, and the
one place that decides whether a failure is the server's (retry later) or a request's (give up).
`open_index` builds the index from the settings, starting the embedded server when asked."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import re
import ssl
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx
import structlog
import tenacity
import typesense
from typesense import exceptions as ts

from outbox_sync.config import DEFAULT_TIMEOUT_S, parse_node
from outbox_sync.errors import (
    CollectionNotFoundError,
    ConfigError,
    NotFoundError,
    SchemaMismatchError,
    TypesenseError,
    TypesenseRejectedError,
    TypesenseUnavailableError,
)
from outbox_sync.localserver import (
    LocalTypesense,
    embedded_api_key,
    reached_port,
    read_embedded_api_key,
    refused_key_advice,
)
from outbox_sync.mapping import SEQUENCES, Mapping

if TYPE_CHECKING:
    from outbox_sync.config import Settings

# Import requests a drain or a reindex keeps in flight, never two touching the same record.
# Two keep Typesense busy: it reads the second request's body while it indexes the first
# (measured on 0.24.1, three rounds: 100k documents at 5,000 per request took 8-10 % less time
# with two in flight than with one; three were no faster than two).
IN_FLIGHT = 2
# Ids per filter_by of a delete or an export by id.
MAX_DELETE_IDS = 1000
# The most bytes of documents one import request carries: a longer body goes in several, each
# cut after a whole line. Reads of rows stay near db.READ_MAX_BYTES, but a read is sized by the
# one before it: this bounds each request's copies of its body whatever its batch holds.
IMPORT_MAX_BYTES = 16 * 1024 * 1024
# Characters a filter_by of ids may take in the URL, percent-encoded (`id_filters`); a count
# alone does not bound it: 1,000 URLs as keys make ~100 KB, and httpx refuses a query over
# 64 KiB (InvalidURL). Typesense 0.24.1 answered a 47 KB URL, but a proxy in front may not:
# nginx answers 414 to a request line over its 8 KiB header buffer, Apache over 8,190 bytes.
# 6 KiB leaves room for the method, the path and a long collection name, and holds the
# longest id alone (MAX_ID_BYTES, 3 characters a byte: 3 KiB).
MAX_FILTER_URL_CHARS = 6 * 1024

# Typesense 0.24.1 closes a connection left idle for 60 s (measured). A connection of the
# restart watch that was used within this long, found closed, was closed by the server
# stopping, not by that timeout.
RESTART_WATCH_FRESH_S = 30.0
# A node whose watched connection is lost twice within this long closes connections itself
# (a proxy): its watch is turned off rather than audit again and again.
RESTART_WATCH_FLAP_S = 600.0
# How long the restart watch waits for a node to answer: it must not hold up the loop.
RESTART_WATCH_TIMEOUT_S = 1.0

T = TypeVar("T")
SUCCESS_LINE = '{"success":true}'
# What a refused key asks for, unless the index knows better (`TypesenseIndex.key_advice`).
KEY_ADVICE = "check TYPESENSE_API_KEY or --api-key-file"
OUT_OF_RESOURCES = "running out of resource"


@dataclass(frozen=True)
class ImportResult:
    """Typesense's verdict on one line of an import."""

    ok: bool
    http_status: int | None = None
    error: str | None = None


ACCEPTED = ImportResult(True)  # one for every accepted line (an import has thousands)


def path_segment(doc_id: str) -> str:
    """A document id as one segment of a URL's path: every character percent-encoded but
    letters, digits and `_.-~`, and `.` and `..` too, which an HTTP client resolves as a path:
    the repair's DELETE of a document `..` went to /collections/NAME/ and dropped the whole
    collection (found by a hostile review)."""
    segment = quote(doc_id, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


def classify(error: Exception, collection: str | None, key_advice: str = KEY_ADVICE) -> Exception:
    """Map a client or transport exception onto our hierarchy. `collection`: the collection
    the request was about, when a 404 means that it is missing; None when a 404 means a
    document or an alias is. `key_advice`: what a refused key asks for. Unknown exceptions
    pass through."""
    if isinstance(error, TypesenseError):
        return error
    unverified = _certificate_error(error)
    if unverified is not None:  # a configuration problem: retrying cannot help
        return TypesenseRejectedError(
            f"Typesense's TLS certificate could not be verified ({unverified.verify_message}): "
            "pass the CA that signed it with --ca-file (OUTBOX_SYNC_CA_FILE), or fix the "
            "server's certificate"
        )
    if isinstance(error, httpx.TransportError | ts.Timeout | ts.HTTPStatus0Error):
        return TypesenseUnavailableError(f"Typesense unreachable: {type(error).__name__}: {error}")
    if isinstance(error, ts.TypesenseClientError) and len(error.args) >= 2:
        return status_error(int(error.args[0]), str(error.args[1]), collection, key_advice)
    if isinstance(error, ts.TypesenseClientError):  # e.g. a response that is not JSON
        return TypesenseUnavailableError(f"Typesense gave a broken response: {error}")
    return error


def status_error(
    status: int, message: str, collection: str | None, key_advice: str = KEY_ADVICE
) -> TypesenseError:
    """Our error for an HTTP status Typesense answered with, by status alone: servers word
    their messages differently from version to version ("Not Found", "Collection not found").
    The one exception: a 422 is server trouble only when the server is out of disk or memory,
    which only its words tell ("Rejecting write: running out of resource type: OUT_OF_DISK",
    the same from 0.24.1 to 30)."""
    if status >= 500 or (status == 422 and OUT_OF_RESOURCES in message):
        return TypesenseUnavailableError(f"Typesense answered {status}: {message}", status, message)
    if status in (401, 403):
        return TypesenseRejectedError(
            f"Typesense refused the API key ({status}): {key_advice}",
            status,
            message,
        )
    if status == 404 and collection is not None:
        return CollectionNotFoundError(collection, message)
    if status == 404:
        return NotFoundError(f"Typesense answered 404: {message}", status, message)
    return TypesenseRejectedError(f"Typesense answered {status}: {message}", status, message)


def ca_context(ca_file: str) -> ssl.SSLContext:
    """TLS trusting the CA bundle in `ca_file`, loaded once for every client of the index; a
    ConfigError naming the file when it holds no certificate (a key, a DER file, a cut copy)."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(
            f"CA file {ca_file} holds no certificate TLS can use ({error}): give the PEM bundle "
            "of the CA that signed Typesense's certificate (--ca-file, OUTBOX_SYNC_CA_FILE)"
        ) from None


def _certificate_error(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a transport error, if that is what it is
    (httpx wraps it in its ConnectError, as an argument or a cause)."""
    seen: list[BaseException] = []
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        if any(current is other for other in seen) or len(seen) > 20:
            continue
        seen.append(current)
        linked = [current.__cause__, current.__context__, *current.args]
        pending.extend(x for x in linked if isinstance(x, BaseException))
    return None


# The policy for server trouble: one immediate retry, then stop (the caller keeps the rows
# queued and backs off). The client's own retries are off (num_retries=0).
RETRY_ONCE = tenacity.Retrying(
    stop=tenacity.stop_after_attempt(2),
    wait=tenacity.wait_none(),
    retry=tenacity.retry_if_exception_type(TypesenseUnavailableError),
    reraise=True,
)


class TypesenseIndex:
    """One collection on one Typesense server or cluster."""

    def __init__(
        self,
        nodes: Sequence[str],
        api_key: str,
        collection: str,
        *,
        mapping: Mapping = SEQUENCES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        ca_file: str | None = None,
    ) -> None:
        self.collection = collection
        # What the documents are; once ensure_collection has looked at the collection, as the
        # collection lets them be (its int32 or int64, its required fields).
        self.mapping = mapping
        # What they are meant to be: what a rebuild makes (`create_versioned`).
        self.configured = mapping
        # Typed as Any: the client's TypedDicts add nothing over the checks made here.
        parsed = [parse_node(url) for url in nodes]
        https = any(node["protocol"] == "https" for node in parsed)
        config: Any = {
            "nodes": parsed,
            "api_key": api_key,
            "num_retries": 0,
            "connection_timeout_seconds": timeout_s,
            # Plain http has no certificate to verify: without one httpx spares loading its CA
            # bundle, ~60 ms of every start (and of every audit's export) here.
            "verify": ca_context(ca_file) if ca_file else https,
        }
        self.client: Any = typesense.Client(config)
        self.documents: Any = self.client.collections[collection].documents
        # Where writes go: the real collection behind the alias, once ensure_collection has
        # found it. Typesense replays its log after a restart in queues per collection name,
        # in parallel: an import sent through the alias could be replayed before the
        # collection it needs, and dropped (7 of 10 restarts lost documents so, 0 of 12 with
        # the real name; tests/test_localserver.py).
        self.writes: Any = self.documents
        # Called with (operation, outcome, seconds) after every request: metrics and stats.
        self.observe: Callable[[str, str, float], None] | None = None
        # The embedded server this index talks to, when it is the embedded one.
        self.server: LocalTypesense | None = None
        # Moves with every write request (imports, deletes; `_write`): how the collection watch
        # tells a change of the documents by another from the daemon's own.
        self.sent = 0
        # What a refused key asks for: the embedded server's own words when it has them.
        self.key_advice = KEY_ADVICE

    def _call(self, operation: str, request: Callable[[], T], *, about: str = "documents") -> T:
        """Run one request; classify its failure; report its duration to `observe`.

        `about` says what a 404 means: "collection" (the request reads the collection: it is
        missing), "documents" (a document or a field is missing, or the collection is: a
        lookup decides, raising CollectionNotFoundError for the collection and NotFoundError
        for the rest), "other" (NotFoundError: an alias, another collection)."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            return request()
        except Exception as error:
            about_collection = self.collection if about == "collection" else None
            classified = classify(error, about_collection, self.key_advice)
            if isinstance(classified, TypesenseUnavailableError):
                outcome = "unavailable"
            elif isinstance(classified, TypesenseRejectedError):
                outcome = "rejected"
            else:
                outcome = "error"
            if type(classified) is NotFoundError and about == "documents":
                self.look_for_collection()
            raise classified from None
        finally:
            if self.observe is not None:
                self.observe(operation, outcome, time.perf_counter() - started)

    def _call_retrying(
        self, operation: str, request: Callable[[], T], *, about: str = "documents"
    ) -> T:
        """`_call` under RETRY_ONCE."""
        result: T = RETRY_ONCE.copy()(self._call, operation, request, about=about)
        return result

    def _write(self, operation: str, request: Callable[[], T]) -> T:
        """`_call_retrying` of a request that writes documents, counted in `sent` as it goes
        and once it is answered: a look at the collection while it is in flight sees `sent`
        move by the next look."""
        self.sent += 1
        try:
            return self._call_retrying(operation, request)
        finally:
            self.sent += 1

    # -- collection -----------------------------------------------------------------------------

    def ensure_collection(self) -> bool:
        """Create the collection if absent (True), or check its schema and take the mapping as
        it lets it be (`Mapping.against`); SchemaMismatchError says what differs. Never index
        into a collection of another shape.

        A new collection is created under a versioned name with `collection` as an alias to
        it, so `reindex` can later swap in a rebuilt one without a moment of downtime. Only the
        daemon calls this, holding its lock: it also drops what a rebuild cut short left behind
        (`drop_leftovers`)."""
        try:
            existing = self.info()
        except CollectionNotFoundError:
            if self.recover_name() is None:
                created = self.create_versioned()
                self.point_alias(created)
                self.retarget(created)
                return True
            existing = self.info()
        target = str(existing.get("name", self.collection))
        self.retarget(target)
        self.drop_leftovers(target)
        if problems := self._take(existing):
            raise SchemaMismatchError(
                f"Typesense collection {self.collection!r} has an incompatible schema: "
                + "; ".join(problems)
                + f". Run `outbox-sync reindex --collection {self.collection}` to rebuild it "
                "with the mapping's fields (no downtime), or use another collection."
            )
        return False

    def fields_changed(self, existing: dict[str, Any] | None = None) -> list[str]:
        """What keeps the collection, as Typesense has it now (`existing`: its `info()`), from
        taking the configured mapping's documents (`Mapping.against`); empty when nothing does.
        Its fields can change after the daemon checked them at start: Typesense alters a
        collection in place (PATCH /collections/NAME, a field dropped or given another type)."""
        existing = self.info() if existing is None else existing
        return self.configured.against(existing.get("fields", []))[1]

    def recover_name(self) -> str | None:
        """For a name that is missing: point it at the newest rebuilt collection, if there is
        one (a reindex that failed between dropping a plain collection and pointing the alias
        left it, whole), and say which; None when there is none."""
        versions = self.versions()
        if not versions:
            return None
        self.point_alias(versions[-1])
        return versions[-1]

    def take_as_it_is(self) -> None:
        """Take the mapping as the collection lets it be, as `ensure_collection` does for the
        daemon, creating and dropping nothing: a command that judges rows (`audit`) judges
        them as the daemon indexes them. A collection of another shape changes nothing."""
        self._take(self.info())

    def _take(self, existing: dict[str, Any]) -> list[str]:
        """Take the mapping as this collection lets it be (its int32 or int64, its required
        fields: `Mapping.against`) unless it differs in more: what differs, then."""
        effective, problems = self.mapping.against(existing.get("fields", []))
        if not problems:
            self.mapping = effective
        return problems

    def retarget(self, name: str) -> None:
        """Send writes to this real collection (the alias's target)."""
        self.writes = self.client.collections[name].documents

    @property
    def written(self) -> str:
        """The real name writes go to."""
        return str(self.writes.collection_name)

    def follow(self, existing: dict[str, Any]) -> str | None:
        """Where our name now points at another collection than the one written to (`existing`:
        its `info()`; someone moved the alias), write to that one, taking the mapping as it
        lets it be: the collection written to before; None when the name has not moved."""
        if (now := str(existing.get("name", self.collection))) == self.written:
            return None
        before = self.written
        self.retarget(now)
        self._take(existing)
        return before

    def look_for_collection(self) -> None:
        """After a 404 about documents: CollectionNotFoundError when the collection is what is
        missing, by our name or the real one writes go to. A blue/green swap by hand (the
        alias pointed at a new collection, the old one dropped) leaves the name whole and the
        writes' collection gone: the daemon stopped at its next import (found by a review)."""
        self.info()
        if self.written == self.collection:
            return
        written = self.client.collections[self.written]
        try:
            self._call("collection", written.retrieve, about="other")
        except NotFoundError:
            raise CollectionNotFoundError(
                self.collection, f"{self.written!r}, which it named when writes began, is gone"
            ) from None

    def info(self) -> dict[str, Any]:
        """The collection as Typesense describes it (CollectionNotFoundError if absent)."""
        collection = self.client.collections[self.collection]
        return dict(self._call("collection", collection.retrieve, about="collection"))

    def target(self) -> str | None:
        """The real collection behind our name: an alias's target, the name itself for a plain
        collection, or None when neither exists."""
        with contextlib.suppress(NotFoundError):
            alias = self._call(
                "alias", self.client.aliases[self.collection].retrieve, about="other"
            )
            return str(alias["collection_name"])
        with contextlib.suppress(CollectionNotFoundError):
            self.info()
            return self.collection
        return None

    def versions(self) -> list[str]:
        """The collections `create_versioned` made for our name, oldest first."""
        pattern = re.compile(re.escape(self.collection) + r"_v\d{17}")
        listed = self._call("collection", self.client.collections.retrieve, about="other")
        return sorted(c["name"] for c in listed if pattern.fullmatch(c["name"]))

    def drop_leftovers(self, target: str) -> list[str]:
        """Drop the collections `create_versioned` made for our name that no alias points at,
        `target` (the one in use) aside: a rebuild cut short (SIGKILL, a power cut) leaves its
        half-filled one, or the old one it could not drop, in Typesense's memory for good. Call
        it holding the daemon lock: only its holder rebuilds, so none of them is being filled.
        Their names."""
        others = [name for name in self.versions() if name != target]
        if not others:  # nearly always: spare the look-up of the aliases
            return []
        listed = self._call("alias", self.client.aliases.retrieve, about="other")
        aliased = {alias["collection_name"] for alias in listed["aliases"]}
        leftovers = [name for name in others if name not in aliased]
        for name in leftovers:
            self.drop_collection(name)
            structlog.get_logger("outbox_sync").warning(
                "leftover_collection_dropped",
                collection=name,
                alias=self.collection,
                target=target,
                note="left by a rebuild that did not finish (killed?); no alias points at it",
            )
        return leftovers

    def create_versioned(self) -> str:
        """Create an empty collection `<name>_v<UTC time>` with the mapping's schema, as
        configured (not as an existing collection let it be: applying it is what `reindex` is
        for); its name."""
        now = time.time()
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}"
        name = f"{self.collection}_v{stamp}"
        try:
            self.create_collection(self.configured.collection_schema(name))
        except TypesenseRejectedError as error:  # a field option Typesense does not take
            if error.http_status != 400:
                raise
            raise ConfigError(
                f"{self.configured.origin}: Typesense refuses its fields for collection "
                f"{self.collection!r}: {error.reason}"
            ) from None
        return name

    def create_collection(self, schema: dict[str, Any]) -> None:
        """Create a collection of this schema, as it is (the mapping's, or the claims')."""
        self._call_retrying("collection", lambda: self.client.collections.create(schema))

    def point_alias(self, target: str) -> None:
        """Make our name an alias of `target` (an atomic switch for searches)."""
        self._call_retrying(
            "alias",
            lambda: self.client.aliases.upsert(self.collection, {"collection_name": target}),
        )

    def drop_collection(self, name: str) -> None:
        self._call_retrying("collection", self.client.collections[name].delete, about="other")

    def on_collection(self, name: str, mapping: Mapping | None = None) -> TypesenseIndex:
        """The same server and settings, working on another collection (by its real name), of
        the same mapping or another."""
        other = copy.copy(self)
        other.collection = name
        other.documents = other.writes = self.client.collections[name].documents
        other.mapping = mapping or self.mapping
        other.configured = mapping or self.configured
        return other

    def count(self) -> int:
        return int(self.info()["num_documents"])

    def restart_watch(self) -> RestartWatch:
        """A watch on the restarts of this index's nodes."""
        return RestartWatch(
            [node.url() for node in self.client.config.nodes], self.client.config.verify
        )

    def health_problem(self) -> str | None:
        """Why Typesense cannot take writes, or None when it can: `/health` answers ok, and
        (since 26) names no `resource_error` (OUT_OF_DISK, OUT_OF_MEMORY), which a server
        reports while answering ok. The daemon's log and /healthz say it: "unhealthy" alone
        left on-call to guess between the network, the server and its disk."""
        try:
            health = self._call(
                "health",
                lambda: self.client.api_call.get("/health", as_json=True, entity_type=dict),
                about="other",
            )
        except TypesenseError as error:
            return str(error)
        if health.get("resource_error"):
            return f"Typesense is out of a resource: {health['resource_error']}"
        return None if health.get("ok") else f"/health answered {json.dumps(health)}"

    # -- documents ------------------------------------------------------------------------------

    def import_jsonl(
        self, body: bytes, count: int, *, action: str = "upsert"
    ) -> list[ImportResult]:
        """Upsert `count` documents given as JSONL (or "create" them: a line whose id the
        collection holds fails with 409). Typesense answers 200 even when lines fail: the
        verdicts come one per line, in order (0.24.1 omits ids on failed lines). A body over
        IMPORT_MAX_BYTES goes in several requests."""
        results: list[ImportResult] = []
        for part in split_lines(body, IMPORT_MAX_BYTES):
            response = self._write(
                "import", functools.partial(self.writes.import_, part, {"action": action})
            )
            # "\n" only: a refused line echoes its document, and JSON leaves U+2028, U+2029
            # and U+0085 unescaped, which str.splitlines() would also split on.
            for line in response.split("\n"):
                if line == SUCCESS_LINE:  # nearly every line: skip parsing it
                    results.append(ACCEPTED)
                elif line.strip():
                    item = parse_line(line, "import response")
                    error = None if item.get("success") else str(item.get("error"))
                    results.append(ImportResult(error is None, item.get("code"), error))
        if len(results) != count:
            raise TypesenseUnavailableError(
                f"import answered {len(results)} results for {count} documents"
            )
        return results

    def delete_ids(self, ids: Sequence[str]) -> int:
        """Delete documents by id, in requests `id_filters` bounds. Missing ids are ignored
        (already gone is success)."""
        listed, alone = split_ids(ids)
        deleted = 0
        for filter_by in id_filters(listed):
            params = {"filter_by": filter_by}
            response: dict[str, Any] = self._write(
                "delete", functools.partial(self.writes.delete, params)
            )
            deleted += int(response.get("num_deleted", 0))
        for doc_id in alone:
            deleted += self.delete_document(doc_id)
        return deleted

    def export_ids(self, ids: Sequence[str]) -> Iterator[dict[str, Any]]:
        """The documents of these ids that exist, in requests `id_filters` bounds."""
        listed, alone = split_ids(ids)
        for filter_by in id_filters(listed):
            yield from self.export_documents(filter_by)
        for doc_id in alone:
            if (document := self.retrieve(doc_id)) is not None:
                yield document

    def retrieve(self, doc_id: str) -> dict[str, Any] | None:
        """One document, or None when the collection has no such id."""
        document = self.documents[path_segment(doc_id)]
        try:
            return dict(self._call("retrieve", document.retrieve))
        except CollectionNotFoundError:
            raise
        except NotFoundError:
            return None

    def delete_document(self, doc_id: str) -> bool:
        """Delete one document by id, whatever characters the id holds. False when it was not
        there."""
        document = self.writes[path_segment(doc_id)]
        try:
            self._write("delete", document.delete)
        except CollectionNotFoundError:
            raise
        except NotFoundError:
            return False
        return True

    def search(self, params: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("search", lambda: self.documents.search(params)))

    def export_documents(self, filter_by: str | None = None) -> Iterator[dict[str, Any]]:
        """Every document of the collection (or those matching `filter_by`), streamed from
        Typesense's JSONL export: memory stays flat however large the collection (the client's
        own export reads everything into one string). A failure mid-stream, or a line that is
        not a document (a newer server can write a plain-text error into the stream), raises
        TypesenseUnavailableError: the caller tries again later."""
        for line in self.export_lines(filter_by):
            yield export_document(line)

    def export_lines(self, filter_by: str | None = None) -> Generator[str, None, None]:
        """The lines of the export as Typesense wrote them, unread (`export_document` reads
        one)."""
        path = f"/collections/{quote(self.collection, safe='')}/documents/export"
        yield from self._stream_lines(path, {"filter_by": filter_by} if filter_by else {})

    def _stream_lines(self, path: str, params: dict[str, str]) -> Iterator[str]:
        """The lines of a GET's body as they arrive, from the first node that answers (once
        a node has started answering, its failure is final)."""
        config = self.client.config
        with httpx.Client(
            verify=config.verify,
            timeout=httpx.Timeout(config.connection_timeout_seconds),
            headers={"X-TYPESENSE-API-KEY": config.api_key},
        ) as http:
            for position, node in enumerate(config.nodes):
                started = False
                try:
                    with http.stream("GET", node.url() + path, params=params) as response:
                        if response.status_code != 200:
                            response.read()
                            message = _error_message(response)
                            raise status_error(response.status_code, message, None, self.key_advice)
                        for line in _lines(response.iter_bytes()):
                            started = True
                            yield line
                    return
                except Exception as error:
                    classified = classify(error, None, self.key_advice)
                    if type(classified) is NotFoundError:
                        self.look_for_collection()
                    last = position + 1 == len(config.nodes)
                    if started or last or not isinstance(classified, TypesenseUnavailableError):
                        raise classified from None


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Non-blank lines of a byte stream, split on "\\n" only: JSON leaves U+2028, U+2029 and
    U+0085 unescaped, and httpx's iter_lines() splits on them as str.splitlines() does."""
    rest = b""
    for chunk in chunks:
        *lines, rest = (rest + chunk).split(b"\n")
        yield from (line.decode() for line in lines if line.strip())
    if rest.strip():
        yield rest.decode()


def split_lines(body: bytes, limit: int) -> Iterator[bytes]:
    """`body` in parts of at most `limit` bytes, each cut after a whole line (a line longer
    than `limit` is a part of its own); `body` itself when it is no longer."""
    start = 0
    while len(body) - start > limit:
        end = body.rfind(b"\n", start, start + limit + 1)
        if end == -1:  # the next line alone is longer than the limit
            end = body.find(b"\n", start)
            if end == -1:
                break
        yield body[start:end]
        start = end + 1
    yield body[start:] if start else body


def free_request_bodies() -> None:
    """Free the bodies of the import requests answered so far. Each request leaves a reference
    cycle (httpx's request and its stream) holding its body: it outlives a collection of the
    youngest generation while in flight and moves to the next, collected ten times more
    rarely. A drain calls this once per answer: a 1M drain peaked at 93 MB without, 70 MB
    with, at no measurable cost (tests/bench, 2026-11-30)."""
    gc.collect(1)


class RestartWatch:
    """Sees Typesense restart between two requests, where no request failed to tell (0.24.1
    exposes no uptime or start time): a connection of its own to each node, used every few
    seconds. A server closes its connections when it stops, so a connection found closed while
    fresh means the node restarted, or something between dropped it. Either way it may have
    come back without writes it acknowledged: `lost` names such nodes, for an audit.

    A node whose connections do not last (a proxy that closes them sooner, or after each
    answer) cannot be watched so: such an answer, or the second loss within
    RESTART_WATCH_FLAP_S, turns its watch off, with one warning; the scheduled audit is left
    for its restarts."""

    def __init__(self, urls: Sequence[str], verify: Any) -> None:
        self.urls, self.verify = list(urls), verify  # verify: httpx's, as the client's nodes
        self.http: httpx.Client | None = None  # made at the first look, again after close()
        self.seen: dict[str, tuple[object, float]] = {}  # node: (its connection, last used)
        self.lost_at: dict[str, float] = {}  # node: when its connection was last lost
        self.quiet_until: dict[str, float] = {}  # node: not asked before (it timed out)
        self.off: dict[str, str] = {}  # node: why it is no longer watched

    def lost(self, now: float) -> list[str]:
        """The nodes whose connection, used within RESTART_WATCH_FRESH_S, was closed since.
        A node that does not answer is left for the loop's own requests to find down; one too
        slow to answer (a busy server) cost the connection httpx dropped, which tells nothing:
        the next one is taken as the one to watch, and the node is left alone a while (a
        node that does not answer at all costs the loop the timeout at every look)."""
        if not self.urls:
            return []
        if self.http is None:
            self.http = httpx.Client(
                verify=self.verify,
                timeout=httpx.Timeout(RESTART_WATCH_TIMEOUT_S),
                limits=httpx.Limits(keepalive_expiry=2 * RESTART_WATCH_FRESH_S),
            )
        lost = []
        for url in list(self.urls):
            if now < self.quiet_until.get(url, now):
                continue
            try:
                response = self.http.get(url + "/health")
            except httpx.TimeoutException:  # slow, not gone: the connection dropped tells nothing
                self.seen.pop(url, None)
                self.quiet_until[url] = now + RESTART_WATCH_FRESH_S
                continue
            except httpx.HTTPError:  # down, or going: its next answer tells
                continue
            connection = response.extensions.get("network_stream")
            last, used_at = self.seen.get(url, (connection, now))
            self.seen[url] = (connection, now)
            if (
                response.http_version != "HTTP/1.1"
                or "close" in response.headers.get("connection", "").lower()
            ):
                self._off(url, "it closes each connection after its answer")
            elif connection is not last and now - used_at < RESTART_WATCH_FRESH_S:
                if now - self.lost_at.get(url, float("-inf")) < RESTART_WATCH_FLAP_S:
                    # a proxy, or a server restarting again (a crash loop): watched no more,
                    # but this loss may be a restart's like the first, and is audited too
                    self._off(url, "its connections were closed twice within minutes")
                self.lost_at[url] = now
                lost.append(url)
        return lost

    def _off(self, url: str, reason: str) -> None:
        self.urls.remove(url)
        self.off[url] = reason
        structlog.get_logger("outbox_sync").warning(
            "restart_watch_off",
            node=url,
            reason=reason,
            note="a proxy between? its restarts are left to the scheduled audit",
        )

    def forget(self) -> None:
        """Take the next connections as the ones to watch, and the losses seen so far as none
        (after an outage the loop saw, whose restart is no loss of the watch's)."""
        self.seen.clear()
        self.lost_at.clear()

    def close(self) -> None:
        """Close the connections; the next look opens new ones, taken as the ones to watch."""
        if self.http is not None:
            self.http.close()
            self.http = None
        self.seen.clear()


def export_document(line: str) -> dict[str, Any]:
    """The document of an export line; a line that is not one is server trouble (a newer
    server can write a plain-text error into the stream): TypesenseUnavailableError."""
    document = parse_line(line, "export line")
    if "id" not in document:
        raise TypesenseUnavailableError(
            f"Typesense sent an export line without an id: {line[:200]!r}"
        )
    return document


def parse_line(line: str, what: str) -> dict[str, Any]:
    """One JSON object of a JSONL answer; anything else is a broken answer (server trouble)."""
    try:
        item = json.loads(line)
    except ValueError:
        item = None
    if not isinstance(item, dict):
        raise TypesenseUnavailableError(f"Typesense sent a broken {what}: {line[:200]!r}")
    return item


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message", response.text))
    except ValueError:
        return response.text[:200]


def split_ids(ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Ids a filter can list, and ids it cannot, asked for one by one, by URL. In a filter
    value of 0.24.1 a backtick cannot be quoted, a backslash escapes what follows it, and the
    spaces around a value are dropped: `id:[` a`]` deletes document "a", not " a"."""
    listed: list[str] = []
    alone: list[str] = []
    for doc_id in ids:
        filterable = doc_id == doc_id.strip() and "`" not in doc_id and "\\" not in doc_id
        (listed if filterable else alone).append(doc_id)
    return listed, alone


def id_filter(ids: Sequence[str]) -> str:
    """filter_by for these ids: each in backticks, so that commas, spaces, brackets and the
    like stay part of the value (decimal ids need none)."""
    return f"id:[{','.join(map(_filter_value, ids))}]"


def id_filters(ids: Sequence[str]) -> Iterator[str]:
    """filter_by values for these ids (ones a filter can list: `split_ids`), in order, each of
    at most MAX_DELETE_IDS ids and MAX_FILTER_URL_CHARS characters in the URL. An id longer
    than the budget alone would get a filter of its own; none is: the mapping refuses ids over
    MAX_ID_BYTES, and the budget holds the longest."""
    empty = _url_chars(id_filter([]))
    chunk: list[str] = []
    chars = empty
    for doc_id in ids:
        cost = _url_chars(_filter_value(doc_id) + ",")
        if chunk and (len(chunk) == MAX_DELETE_IDS or chars + cost > MAX_FILTER_URL_CHARS):
            yield id_filter(chunk)
            chunk, chars = [], empty
        chunk.append(doc_id)
        chars += cost
    if chunk:
        yield id_filter(chunk)


def _filter_value(doc_id: str) -> str:
    return doc_id if doc_id.isascii() and doc_id.lstrip("-").isdigit() else f"`{doc_id}`"


def _url_chars(text: str) -> int:
    """Characters `text` takes in a URL's query at most: httpx encodes no more than quote()
    with nothing safe (it writes a space as "+", one character where quote() writes three)."""
    return len(quote(text, safe=""))


@contextlib.contextmanager
def open_indexes(
    settings: Settings,
    mappings: Sequence[Mapping],
    *,
    start_embedded: bool,
    heartbeat: Callable[[], None] = lambda: None,
) -> Iterator[dict[str, TypesenseIndex]]:
    """The index of each mapping, by mapping name (one client for all). With no URL
    configured, the embedded server: started (and stopped at the end) with start_embedded, only
    reached otherwise (it runs while a daemon does). `heartbeat` is called while the server
    starts (LocalTypesense.wait_ready): raising there ends the wait, and stops the server."""
    server = None
    if settings.embedded:
        # reaching a running embedded server creates nothing (a read-only directory is fine);
        # with no key made yet, no server ever ran: requests say it is unreachable
        found = read_embedded_api_key(settings.embedded_dir)
        key = settings.api_key or (
            embedded_api_key(settings.embedded_dir) if start_embedded else found or "none"
        )
        port = settings.embedded_port
        if not start_embedded:
            port = reached_port(settings.embedded_dir, port)
        server = LocalTypesense(settings.embedded_dir, api_key=key, port=port)
        urls: Sequence[str] = [server.url]
    else:
        assert settings.api_key is not None  # build_settings requires one with a URL
        key, urls = settings.api_key, settings.typesense_urls
    # a start cut short (a stop asked for meanwhile, a server never ready) stops it too
    try:
        if server is not None and start_embedded:
            structlog.get_logger("outbox_sync").info(
                "embedded_typesense_starting",
                url=server.url,
                data_dir=str(settings.embedded_dir),
                note="no TYPESENSE_URL set: using the embedded server",
            )
            server.start(heartbeat=heartbeat)
        first, *rest = mappings
        index = TypesenseIndex(
            urls,
            key,
            first.collection,
            mapping=first,
            timeout_s=settings.timeout_s,
            ca_file=None if server else settings.ca_file,
        )
        index.server = server
        if server is not None and not start_embedded and settings.api_key is None:
            # the key came from the server's directory: a refusal means it changed there
            index.key_advice = refused_key_advice(settings.embedded_dir, server.port, found)
        indexes = {first.name: index}
        for mapping in rest:
            indexes[mapping.name] = index.on_collection(mapping.collection, mapping)
        yield indexes
    finally:
        if server is not None:
            server.stop()
