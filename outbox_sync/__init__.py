"""outbox-sync: keep a Typesense collection in step with a SQLite table."""

__version__ = "0.1.0"
