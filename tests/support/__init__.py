"""Plain helpers for the tests (fixtures stay in tests/conftest.py):

- app: the application's side of the database: its connection, its rows, what search should hold
- characters: the custom mapping of docs/tables.md: its configuration, tables, rows, documents
- typesense: the test server's address, and Typesense read or changed by hand
- cli: `outbox-sync` invoked in-process, or as a process, without settings from this environment
- daemon: the daemon as a process, the worker in a thread, a drain, a recorded failure
- wait: waiting for a positive event, with a deadline
- fake_index: an index in memory that fails on demand, for the worker's failure branches
- faultproxy: a fault-injecting HTTP proxy between the daemon and Typesense, which can also
  answer in the shape of Typesense 29/30
- writer: an application writing from its own process (`python -m tests.support.writer`)
"""
