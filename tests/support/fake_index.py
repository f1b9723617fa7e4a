"""A Typesense index in memory that fails on demand: for the worker's failure branches, which
the real server cannot be made to take at will."""

import json
import threading
from collections.abc import Generator, Iterator
from typing import Any

from outbox_sync.errors import TypesenseUnavailableError
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import ImportResult, RestartWatch


class FakeIndex:
    """Refuses the document with id `bad` `refusals` times; fails whole requests while
    `down` > 0 (counting down)."""

    collection = "fake"

    def __init__(self, bad: str = "", refusals: int = 0, down: int = 0) -> None:
        self.bad, self.refusals, self.down = bad, refusals, down
        self.imports: list[list[str]] = []
        self.documents: dict[str, bytes] = {}
        self.observe = None
        self.mapping = SEQUENCES
        self.sent = 0  # as TypesenseIndex.sent: moves with every write (the collection watch)

    def ensure_collection(self) -> bool:
        return False

    def health_problem(self) -> str | None:
        return None if self.down == 0 else "down"

    def target(self) -> str | None:
        return self.collection  # no alias: no reindex switches it

    # What the loop's collection watch reads, at its first turn and every minute: a collection
    # of the mapping's fields that its name keeps pointing at (its outage is the drain's).
    def info(self) -> dict[str, Any]:
        return {"name": self.collection, "num_documents": len(self.documents)}

    def follow(self, existing: dict[str, Any]) -> str | None:
        return None

    def fields_changed(self, existing: dict[str, Any] | None = None) -> list[str]:
        return []

    def restart_watch(self) -> RestartWatch:
        return RestartWatch([], verify=False)  # no node to watch

    def import_jsonl(self, body: bytes, count: int) -> list[ImportResult]:
        self.sent += 1
        self._answer(counts=True)
        lines = body.split(b"\n")
        ids = document_ids(body)
        self.imports.append(ids)
        results = []
        for doc_id, line in zip(ids, lines, strict=True):
            if doc_id == self.bad and self.refusals > 0:
                self.refusals -= 1
                results.append(ImportResult(False, 400, "Field `comment` must be a string."))
            else:
                self.documents[doc_id] = line
                results.append(ImportResult(True))
        return results

    def delete_ids(self, ids: list[str]) -> int:
        self.sent += 1
        for doc_id in ids:
            self.documents.pop(doc_id, None)
        return len(ids)

    # What the reconcile after an outage reads (an audit).
    def count(self) -> int:
        self._answer()
        return len(self.documents)

    def export_documents(self, filter_by: str | None = None) -> Iterator[dict[str, Any]]:
        for line in self.export_lines(filter_by):
            yield json.loads(line)

    def export_lines(self, filter_by: str | None = None) -> Generator[str, None, None]:
        """As the daemon wrote them (keys in its order, not in Typesense's)."""
        self._answer()
        wanted = filter_by and filter_by.removeprefix("id:[").removesuffix("]").split(",")
        for doc_id, line in list(self.documents.items()):
            if not wanted or doc_id in wanted:
                yield line.decode()

    def export_ids(self, ids: list[str]) -> Iterator[dict[str, Any]]:
        return self.export_documents(f"id:[{','.join(ids)}]")

    def _answer(self, *, counts: bool = False) -> None:
        """Fail while down; only the loop's own requests count the outage down (the audit's
        run on a thread of their own, at times of their own)."""
        if self.down > 0:
            self.down -= counts
            raise TypesenseUnavailableError("Typesense answered 503: Not Ready or Lagging", 503)


class OverlapIndex(FakeIndex):
    """Holds each import until a second one arrives or `hold_s` passes, and notes the document
    ids of the requests in flight whenever one starts (the last is the one starting)."""

    def __init__(self, hold_s: float = 0.2, **failures: int | str) -> None:
        super().__init__(**failures)  # type: ignore[arg-type]
        self.hold_s = hold_s
        self.flying: list[list[str]] = []
        self.seen_together: list[list[list[str]]] = []
        self.arrived = threading.Condition()

    def import_jsonl(self, body: bytes, count: int) -> list[ImportResult]:
        ids = document_ids(body)
        with self.arrived:
            self.flying.append(ids)
            self.seen_together.append([list(other) for other in self.flying])
            self.arrived.notify_all()
            self.arrived.wait_for(lambda: len(self.flying) > 1, timeout=self.hold_s)
        try:
            return super().import_jsonl(body, count)
        finally:
            with self.arrived:
                self.flying.remove(ids)


def document_ids(body: bytes) -> list[str]:
    """The document ids of a JSONL import body, line by line."""
    return [line.split(b'"id":"')[1].split(b'"')[0].decode() for line in body.split(b"\n")]
