"""The loop's chores, driven turn by turn through `Worker.loop(now)` with explicit times: no
sleeping, no patched clock."""

import threading
from collections.abc import Callable

from outbox_sync.batch import Applier
from outbox_sync.db import Database
from outbox_sync.errors import TypesenseUnavailableError
from outbox_sync.telemetry import Telemetry
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Index, Job, Turn, Worker
from tests.support.fake_index import FakeIndex


def worker_with(
    db: Database, index: Index, *jobs: Job, after_outage: Callable[[], None] = lambda: None
) -> Worker:
    """A loop over `index` with these chores and no backoff delay (a pause returns at once)."""
    telemetry = Telemetry()
    applier = Applier(db, {"sequences": index}, batch_size=100, telemetry=telemetry)  # type: ignore[dict-item]
    return Worker(
        db,
        [index],
        applier,
        jobs,
        telemetry=telemetry,
        after_outage=after_outage,
        min_backoff_s=0,
        max_backoff_s=0,
    )


def test_a_job_runs_at_the_first_turn_then_each_time_its_interval_has_passed(
    db: Database, index: TypesenseIndex
) -> None:
    ran: list[float] = []
    every_10_s = Job("every 10 s", 10, ran.append)
    never = Job("not due at start", 10, lambda now: ran.append(-now), due_at_start=False)
    worker = worker_with(db, index, every_10_s, never)
    stop = threading.Event()
    for now in (100, 105, 109.9, 110, 115, 119, 121):
        assert worker.loop(now, stop) == Turn(0)
    assert ran == [100, 110, 121]  # due again 10 s after it last ran, not on a fixed grid


def test_after_an_outage_the_loop_calls_after_outage_once_typesense_is_back(db: Database) -> None:
    index = FakeIndex(down=1)  # down until the test says otherwise (health probes do not count)
    ran: list[float] = []
    outages: list[float] = []
    now = 0.0

    def needing_typesense(at: float) -> None:
        if not index.healthy():
            raise TypesenseUnavailableError("Typesense answered 503: Not Ready or Lagging")
        ran.append(at)

    worker = worker_with(
        db, index, Job("periodic", 10, needing_typesense), after_outage=lambda: outages.append(now)
    )
    stop = threading.Event()

    now = 100
    assert worker.loop(now, stop) == Turn(paused=True)  # the periodic job failed: a pause
    assert worker.backoff.since is not None
    now = 101
    assert worker.loop(now, stop) == Turn(paused=True)  # still due, Typesense still down
    assert (ran, outages) == ([], [])
    index.down = 0  # Typesense is back
    now = 102
    assert worker.loop(now, stop) == Turn(0)
    assert worker.backoff.since is None
    for now in (103, 111, 112, 200):
        assert worker.loop(now, stop) == Turn(0)
    # the failed periodic job stayed due and ran at once; after_outage once, when it was back
    assert ran == [102, 112, 200]
    assert outages == [102]
