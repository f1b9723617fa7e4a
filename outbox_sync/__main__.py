from outbox_sync.cli import entry

entry()
