"""The command line, a thin skin over the library: parse options, call the library, turn its
errors into one clear line. base.py holds the group, the shared options and the error mapping;
daemon.py the daemon's commands (init, uninstall, run, reindex, status); oncall.py the on-call
commands (errors, audit, search, report); both print through render.py.

A command imports the modules it works with when it runs, not when the command line is built:
the Typesense client, httpx, structlog and prometheus_client took ~0.4 s to import here, which
`--version`, `--help` and a mistyped option need not wait for (docs/performance.md)."""

import gc

from outbox_sync.cli import daemon, oncall  # noqa: F401 - registers their commands
from outbox_sync.cli.base import main

__all__ = ["entry", "main"]


def entry() -> None:
    """`outbox-sync` as a process (the console script, `python -m outbox_sync`). Not in
    `main`: tests call it in their own process.

    Python's garbage collector walks the objects a process has made, most of them made when
    the libraries are imported, and they live to its end. So the collector is off while a
    command starts (from the process's first import: outbox_sync/__main__.py), until it has
    made its Typesense clients (base.started): it collected 86 times while `run --once`
    started, for 15-27 ms of its ~0.25 s. And it is kept from them at exit (0.08 s,
    docs/performance.md): every command has closed what it opened by then (its database
    through click's context, the rest in `with` blocks), so those objects are set aside
    (gc.freeze) and left to the end of the process."""
    gc.disable()
    try:
        main()
    finally:
        gc.freeze()
