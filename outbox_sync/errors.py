"""One error hierarchy. Every message is a sentence a person can act on.

Typesense failures are split in one place (`typesense_index.classify`): server trouble is
retryable (`TypesenseUnavailableError`: the rows stay queued, the loop backs off), a refused
request is not (`TypesenseRejectedError` and its kinds). Callers decide by type, never by text.
"""


class OutboxSyncError(Exception):
    """Base of every error outbox-sync raises on purpose. `retryable`: the daemon waits it out
    (backing off) instead of stopping; nothing is lost meanwhile."""

    retryable = False


class ConfigError(OutboxSyncError):
    """A flag, environment variable or file given to outbox-sync is wrong."""


class DatabaseError(OutboxSyncError):
    """The SQLite file is missing, unreadable, or lacks what outbox-sync needs."""


class DatabaseBusyError(DatabaseError):
    """Another connection held the lock past the busy timeout. Retryable: nothing is lost."""

    retryable = True


class DatabaseDamagedError(DatabaseError):
    """SQLite found the file damaged (SQLITE_CORRUPT, SQLITE_NOTADB): a human restores it."""


class OwnTableMissingError(DatabaseError):
    """One of outbox-sync's own tables was dropped under the running daemon (a migration that
    drops the tables it does not know). Retryable: the daemon's schema check makes it again at
    its next turn, and asks for an audit."""

    retryable = True


class DatabaseFullError(DatabaseError):
    """SQLite could not write: the file system holding the database (or the temporary files
    SQLite sorts in) is full. Retryable: the daemon waits for space, and nothing is lost: an
    entry Typesense has is acknowledged once the write goes through."""

    retryable = True


class TableMissingError(DatabaseError):
    """The synced table is gone (dropped, or renamed away by a migration). Retryable: the daemon
    waits for a table of that name, deleting nothing from Typesense on a guess."""

    retryable = True

    def __init__(self, table: str, path: object) -> None:
        super().__init__(
            f"table {table} is gone from {path}: the sync waits for a table of that name and "
            "deletes nothing from Typesense meanwhile"
        )
        self.table = table


class StoppingError(OutboxSyncError):
    """The daemon is stopping (SIGTERM, Ctrl-C): a long chore (a fill, a reindex) ends between
    two of its chunks, leaving nothing half done in use."""


class AlreadyRunningError(OutboxSyncError):
    """Another daemon, or a reindex run without one (`role`), already works this database."""

    def __init__(self, message: str, role: str) -> None:
        super().__init__(message)
        self.role = role


class SchemaMismatchError(OutboxSyncError):
    """The Typesense collection exists with a schema outbox-sync cannot index into."""


class TypesenseError(OutboxSyncError):
    """A request to Typesense failed as a whole (not one document of it). `reason` is what the
    server (or the transport) said, without our words around it."""

    def __init__(self, message: str, http_status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.http_status = http_status
        self.reason = reason or message


class TypesenseUnavailableError(TypesenseError):
    """Server trouble: unreachable, timed out, 5xx/503, out of resources. Retryable."""

    retryable = True


class TypesenseRejectedError(TypesenseError):
    """Typesense refused the request itself (wrong key, bad parameters). Not retryable."""


class NotFoundError(TypesenseRejectedError):
    """404 for something other than the collection: a document, an alias."""


class CollectionNotFoundError(NotFoundError):
    """The collection (or the alias naming it) does not exist."""

    def __init__(self, collection: str, reason: str = "Not Found") -> None:
        super().__init__(
            f"Typesense collection {collection!r} does not exist (404: {reason})", 404, reason
        )
        self.collection = collection


class InvalidRecordError(OutboxSyncError):
    """A row cannot become a document. The message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class UnknownSyncError(OutboxSyncError):
    """No row of `sync_errors` has this id."""

    def __init__(self, error_id: int) -> None:
        super().__init__(
            f"no sync error has id {error_id}: `outbox-sync errors list --status all` lists them"
        )


class ClosedSyncError(OutboxSyncError):
    """The sync error was closed already: retrying or resolving it again would hide history."""

    def __init__(self, error_id: int, resolution: str) -> None:
        super().__init__(
            f"sync error {error_id} is already closed ({resolution}): see `outbox-sync errors "
            f"show {error_id}`; to sync its record again, run `outbox-sync audit --repair`"
        )
