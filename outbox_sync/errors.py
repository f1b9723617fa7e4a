"""One error hierarchy. Every message is a sentence a person can act on."""


class OutboxSyncError(Exception):
    """Base of every error outbox-sync raises on purpose."""


class ConfigError(OutboxSyncError):
    """A flag, environment variable or file given to outbox-sync is wrong."""


class DatabaseError(OutboxSyncError):
    """The SQLite file is missing, unreadable, or lacks what outbox-sync needs."""


class DatabaseBusyError(DatabaseError):
    """Another connection held the write lock past the busy timeout. Retryable: nothing is lost."""


class AlreadyRunningError(OutboxSyncError):
    """Another daemon already works this database file."""


class SchemaMismatchError(OutboxSyncError):
    """The Typesense collection exists with a schema outbox-sync cannot index into."""


class TypesenseError(OutboxSyncError):
    """A request to Typesense failed as a whole (not one document of it)."""

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class TypesenseUnavailableError(TypesenseError):
    """Server trouble: unreachable, timed out, 5xx/503, out of resources. Retryable."""


class TypesenseRejectedError(TypesenseError):
    """Typesense refused the request itself (wrong key, missing collection). Not retryable."""


class InvalidRecordError(OutboxSyncError):
    """A row of `sequences` cannot become a document. The message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
