"""Two databases syncing into one collection undo each other (each audit deletes the other's
documents): a daemon claims its collections and refuses one another database's daemon feeds."""

import json
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from outbox_sync import claims, reindex, schema
from outbox_sync.claims import CLAIM_FRESH_S, CLAIMS_COLLECTION, Claims, CollectionClaimedError
from outbox_sync.db import Database, fill_key
from outbox_sync.localserver import free_port
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import daemon
from tests.support.app import ROW_SQL, app_connection, make_row
from tests.support.cli import run_module
from tests.support.daemon import Daemon
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.typesense import Server, export
from tests.support.wait import wait_until


def claim_of(server: Server, collection: str) -> dict[str, Any] | None:
    response = httpx.get(
        f"{server.url}/collections/{CLAIMS_COLLECTION}/documents/{collection}",
        headers={"X-TYPESENSE-API-KEY": server.api_key},
    )
    return None if response.status_code == 404 else dict(response.json())


def claims_collection(server: Server, fields: list[dict[str, str]] | None = None) -> None:
    """The claims collection, made anew (of these fields: CLAIMS_SCHEMA's unless given)."""
    headers = {"X-TYPESENSE-API-KEY": server.api_key}
    httpx.delete(f"{server.url}/collections/{CLAIMS_COLLECTION}", headers=headers)
    made = claims.CLAIMS_SCHEMA | ({} if fields is None else {"fields": fields})
    httpx.post(f"{server.url}/collections", headers=headers, json=made).raise_for_status()


def running_claim(server: Server, collection: str) -> bool:
    """Whether a running daemon holds the collection's claim (not one marked stopped)."""
    claim = claim_of(server, collection)
    return claim is not None and not claim.get("stopped")


def second_database(tmp_path: Path) -> Path:
    path = tmp_path / "other" / "app.db"
    path.parent.mkdir()
    database = Database(path, create=True)
    schema.init(database, [SEQUENCES])
    database.close()
    return path


def test_a_second_database_on_a_collection_is_refused_until_the_first_gives_it_back(
    served: Server,
    db_path: Path,
    tmp_path: Path,
    daemon_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    # the second instance's settings forgot OUTBOX_SYNC_COLLECTION: both say `sequences`
    first = start_daemon("--audit-every", "0")
    collection = daemon_env["OUTBOX_SYNC_COLLECTION"]
    wait_until(lambda: running_claim(served, collection), what="the first daemon's claim")
    other = second_database(tmp_path)
    app_connection(other).execute(ROW_SQL, make_row(1))
    env = daemon_env | {"OUTBOX_SYNC_DB": str(other)}
    refused = run_module(["run", "--once"], env=env)
    assert refused.returncode == 1, refused.stderr
    assert "is synced from another database" in refused.stderr
    assert str(db_path.resolve()) in refused.stderr  # which one, so on-call can find it
    assert app_connection(other).execute("SELECT count(*) FROM outbox").fetchone() == (1,)
    # on-call, looking at the second database, is told why its daemon does not run
    checked = run_module(["check"], env=env)
    assert checked.returncode == 2
    assert f"synced from another database: {db_path.resolve()} on " in checked.stdout
    status = json.loads(run_module(["status", "--json"], env=env).stdout)
    (one,) = status["collections"].values()
    assert one["claimed_by"].startswith(str(db_path.resolve()))
    mine = json.loads(run_module(["status", "--json"], env=daemon_env).stdout)
    assert "claimed_by" not in mine["collections"][collection]
    first.process.send_signal(signal.SIGTERM)
    assert first.wait() == 0
    given_back = claim_of(served, collection)
    assert given_back is not None and given_back["stopped"]
    waiting = run_module(["check"], env=env).stdout  # the first stopped: no longer CRITICAL
    assert "is synced from another database" not in waiting
    assert "was last synced from another database" in waiting
    synced = run_module(["run", "--once", "--audit-every", "0"], env=env)
    assert synced.returncode == 0, synced.stderr
    assert '"claim_taken_over"' in synced.stderr
    assert app_connection(other).execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    assert "another database" not in run_module(["check"], env=env).stdout
    # the first database is told: if both go on (their `run --once` taking turns), each
    # one's audit deletes the other's documents
    told = run_module(["check"], env=daemon_env)  # CRITICAL: no daemon runs there now
    assert f"was last synced from another database: {other.resolve()} on " in told.stdout


def test_a_reindex_run_without_a_daemon_claims_too(
    served: Server,
    db_path: Path,
    tmp_path: Path,
    daemon_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    # it writes the collection in the daemon's place: another database's would be replaced
    app_connection(db_path).execute(ROW_SQL, make_row(1))
    collection = daemon_env["OUTBOX_SYNC_COLLECTION"]
    assert run_module(["run", "--once", "--audit-every", "0"], env=daemon_env).returncode == 0
    env = daemon_env | {"OUTBOX_SYNC_DB": str(second_database(tmp_path))}
    first = start_daemon("--audit-every", "0")
    # (not the claim its `run --once` left, marked stopped)
    wait_until(lambda: running_claim(served, collection), what="the first daemon's claim")
    refused = run_module(["reindex"], env=env)
    assert refused.returncode == 1 and "is synced from another database" in refused.stderr
    assert export(served, collection).keys() == {"1"}  # the first database's, as they were
    first.process.send_signal(signal.SIGTERM)
    assert first.wait() == 0
    reindexed = run_module(["reindex"], env=env)
    assert reindexed.returncode == 0, reindexed.stderr
    given_back = claim_of(served, collection)
    assert given_back is not None and given_back["stopped"]


def test_a_copy_of_the_database_elsewhere_is_another_database(
    served: Server,
    db_path: Path,
    tmp_path: Path,
    daemon_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    # the copy holds the same database id: its path tells it apart
    first = start_daemon("--audit-every", "0")
    collection = daemon_env["OUTBOX_SYNC_COLLECTION"]
    wait_until(lambda: running_claim(served, collection), what="the first daemon's claim")
    copy = tmp_path / "copy.db"
    shutil.copyfile(db_path, copy)
    refused = run_module(["run", "--once"], env=daemon_env | {"OUTBOX_SYNC_DB": str(copy)})
    assert refused.returncode == 1 and "is synced from another database" in refused.stderr
    first.kill()


def test_the_same_database_takes_its_claim_back_after_a_kill(
    served: Server, daemon_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    first = start_daemon("--audit-every", "0")
    collection = daemon_env["OUTBOX_SYNC_COLLECTION"]
    wait_until(lambda: running_claim(served, collection), what="a claim")
    first.kill()  # SIGKILL: the claim stays, as a running daemon's
    assert running_claim(served, collection)
    again = run_module(["run", "--once", "--audit-every", "0"], env=daemon_env)
    assert again.returncode == 0, again.stderr


def test_a_claim_gone_stale_is_taken_over_and_said(
    db: Database, index: TypesenseIndex, served: Server, tmp_path: Path
) -> None:
    other = Database(second_database(tmp_path))
    Claims(other, [index])(time.monotonic())  # another database's daemon, killed long ago
    with pytest.raises(CollectionClaimedError):
        Claims(db, [index])(time.monotonic())
    before = claim_of(served, index.collection)
    assert before is not None
    line = before | {"seen_at": int(time.time() - CLAIM_FRESH_S - 1)}
    httpx.post(
        f"{served.url}/collections/{CLAIMS_COLLECTION}/documents?action=upsert",
        headers={"X-TYPESENSE-API-KEY": served.api_key},
        content=json.dumps(line),
    ).raise_for_status()
    with capture_logs() as logs:
        Claims(db, [index])(time.monotonic())
    (taken,) = [log for log in logs if log["event"] == "claim_taken_over"]
    assert taken["previous"]["path"] == before["path"]
    claim = claim_of(served, index.collection)
    assert claim is not None and claim["path"] == str(Path(db.path).resolve())
    other.close()


def test_a_key_that_cannot_claim_turns_the_claims_off_and_syncs(
    served: Server, db_path: Path, collection: str, daemon_env: dict[str, str]
) -> None:
    # a key scoped to the synced collection (as a careful operator makes them) cannot reach
    # the claims: the daemon says so, once, and syncs
    created = httpx.post(
        f"{served.url}/keys",
        headers={"X-TYPESENSE-API-KEY": served.api_key},
        json={"description": "sync only", "actions": ["*"], "collections": [f"{collection}.*"]},
    )
    created.raise_for_status()
    app_connection(db_path).execute(ROW_SQL, make_row(1))
    env = daemon_env | {"TYPESENSE_API_KEY": created.json()["value"]}
    result = run_module(["run", "--once", "--audit-every", "0"], env=env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events].count("claims_off") == 1
    assert app_connection(db_path).execute("SELECT count(*) FROM outbox").fetchone() == (0,)


def test_a_claim_is_refreshed_given_back_and_kept_out_of_the_metrics(
    db: Database, index: TypesenseIndex, served: Server
) -> None:
    seen: list[str] = []
    index.observe = lambda operation, outcome, seconds: seen.append(operation)
    claimed = Claims(db, [index])
    claimed(time.monotonic())
    first = claim_of(served, index.collection)
    assert first is not None
    time.sleep(1.1)  # seen_at counts seconds
    claimed(time.monotonic())  # a refresh, as `keep` makes once CLAIM_REFRESH_S has passed
    refreshed = claim_of(served, index.collection)
    assert refreshed is not None and refreshed["seen_at"] > first["seen_at"]
    assert seen == []  # not the sync's requests: its metrics and weekly report leave them out
    claimed.give_back()
    given_back = claim_of(served, index.collection)
    assert given_back is not None and given_back["stopped"]


def test_of_two_databases_claiming_at_the_same_moment_one_is_refused(
    db: Database,
    index: TypesenseIndex,
    served: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # two daemons started together: each looks before the other has written its claim
    claims_collection(served)  # (the first to make it looks again, as tests before this did)
    other = Database(second_database(tmp_path))
    first, second = Claims(db, [index]), Claims(other, [index])
    look = first.claims.retrieve

    def look_as_the_other_claims(name: str) -> dict[str, Any] | None:
        seen = look(name)
        second(time.monotonic())  # between the first's look and its write
        return seen

    monkeypatch.setattr(first.claims, "retrieve", look_as_the_other_claims)
    with pytest.raises(CollectionClaimedError):  # not both: each audit would undo the other
        first(time.monotonic())
    claim = claim_of(served, index.collection)
    assert claim is not None and claim["path"] == str(Path(other.path).resolve())
    other.close()


def test_a_daemon_serving_a_long_reindex_keeps_its_claim(
    db: Database,
    db_path: Path,
    index: TypesenseIndex,
    served: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the loop's claims job cannot run while the reindex job runs: a rebuild of millions of
    # rows outlasts CLAIM_FRESH_S, and another database's daemon then took the collection
    monkeypatch.setattr(claims, "CLAIM_REFRESH_S", 0.0)  # a refresh due at every beat
    app_connection(db_path).execute(ROW_SQL, make_row(1))
    worker = daemon(db, [index], claims=True)
    worker.loop(time.monotonic(), threading.Event())  # claims, then applies the row
    reindex.request(db, [index.collection])
    claim = claim_of(served, index.collection)
    assert claim is not None
    stale = claim | {"seen_at": int(time.time() - CLAIM_FRESH_S - 1)}  # minutes into it
    httpx.post(
        f"{served.url}/collections/{CLAIMS_COLLECTION}/documents?action=upsert",
        headers={"X-TYPESENSE-API-KEY": served.api_key},
        content=json.dumps(stale),
    ).raise_for_status()
    worker.jobs["reindex"].run(time.monotonic())
    other = Database(second_database(tmp_path))
    with pytest.raises(CollectionClaimedError):
        Claims(other, [index])(time.monotonic())
    other.close()


@pytest.mark.parametrize("chore", ["reindex", "fill"])
def test_a_claim_lost_during_a_fill_or_reindex_stops_the_daemon(
    db: Database,
    db_path: Path,
    index: TypesenseIndex,
    served: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chore: str,
) -> None:
    # the claims deleted by hand, and another database's daemon claiming the collection: the
    # chore's heartbeat finds out, and the daemon must stop there, not go on to audit and drain
    monkeypatch.setattr(claims, "CLAIM_REFRESH_S", 0.0)  # a refresh due at every beat
    app_connection(db_path).execute(ROW_SQL, make_row(1))
    worker = daemon(db, [index], claims=True)
    worker.loop(time.monotonic(), threading.Event())
    if chore == "reindex":
        reindex.request(db, [index.collection])
    else:
        db.set_meta(fill_key(index.mapping.name), "1")  # as `init` asks for one
    httpx.delete(
        f"{served.url}/collections/{CLAIMS_COLLECTION}",
        headers={"X-TYPESENSE-API-KEY": served.api_key},
    ).raise_for_status()
    other = Database(second_database(tmp_path))
    Claims(other, [index])(time.monotonic())
    with pytest.raises(CollectionClaimedError):
        worker.jobs["reindex"].run(time.monotonic())
    assert app_connection(db_path).execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    other.close()


def test_the_loop_refreshes_its_claims_when_due(
    db: Database, index: TypesenseIndex, served: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claims, "CLAIM_REFRESH_S", 1.0)  # 60 s as shipped
    worker = daemon(db, [index], claims=True)
    worker.loop(time.monotonic(), threading.Event())
    first = claim_of(served, index.collection)
    assert first is not None and not first.get("stopped")
    time.sleep(0.5)
    worker.loop(time.monotonic(), threading.Event())  # not due yet
    assert claim_of(served, index.collection) == first
    time.sleep(0.6)  # seen_at counts seconds
    worker.loop(time.monotonic(), threading.Event())  # due
    refreshed = claim_of(served, index.collection)
    assert refreshed is not None and refreshed["seen_at"] > first["seen_at"]


def test_a_claim_of_unexpected_fields_is_read_as_a_stale_one(
    db: Database,
    index: TypesenseIndex,
    served: Server,
    daemon_env: dict[str, str],
    collection: str,
) -> None:
    # written by hand, or by another version into a claims collection of its own schema: the
    # daemon and `check` must not crash on it (a TypeError stopped both); a claim whose age
    # cannot be read is read as one whose age is missing: stale, taken over with a warning
    claims_collection(served, [{"name": ".*", "type": "auto"}])
    odd = {"id": collection, "database": "x", "path": "/elsewhere", "seen_at": "yesterday"}
    odd |= {"stopped": "no", "pid": "?"}
    httpx.post(
        f"{served.url}/collections/{CLAIMS_COLLECTION}/documents",
        headers={"X-TYPESENSE-API-KEY": served.api_key},
        json=odd,
    ).raise_for_status()
    checked = run_module(["check"], env=daemon_env)
    assert "Traceback" not in checked.stderr, checked.stderr
    assert "was last synced from another database: /elsewhere on " in checked.stdout
    assert "seen at a time the claim does not say" in checked.stdout, checked.stdout
    with capture_logs() as logs:
        Claims(db, [index])(time.monotonic())
    assert [log["event"] for log in logs] == ["claim_taken_over"]
    claim = claim_of(served, collection)
    assert claim is not None and claim["path"] == str(Path(db.path).resolve())
    claims_collection(served)  # as shipped, for the tests after this one


def test_a_refresh_that_fails_for_a_moment_ends_nothing(
    db: Database,
    db_path: Path,
    served: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a reindex of millions of rows survives a 503 on a chunk (retried); the claim it holds is
    # fresh for minutes: a 503 on a refresh between two chunks failed the whole reindex
    monkeypatch.setattr(claims, "CLAIM_REFRESH_S", 0.0)  # a refresh due at every beat
    app_connection(db_path).execute(ROW_SQL, make_row(1))
    with FaultProxy(served.url) as proxy:
        index = TypesenseIndex([proxy.url], served.api_key, collection)
        index.ensure_collection()
        worker = daemon(db, [index], claims=True)
        worker.loop(time.monotonic(), threading.Event())  # claims, then applies the row
        reindex.request(db, [collection])
        proxy.add(Fault("status", status=503, path=f"/{CLAIMS_COLLECTION}/documents/"))
        with capture_logs() as logs:
            worker.jobs["reindex"].run(time.monotonic())
        assert json.loads(db.get_meta(reindex.STATUS_KEY) or "{}")["state"] == "done"
        assert [log["event"] for log in logs if log["event"].startswith("claim")] == [
            "claim_not_refreshed"
        ]
        assert proxy.pending_faults() == []  # the refresh did meet it
        claim = claim_of(served, collection)
        assert claim is not None and claim["path"] == str(db_path.resolve())


def test_a_copy_at_the_same_path_on_another_host_is_not_silent(
    db: Database, index: TypesenseIndex, served: Server
) -> None:
    # a backup restored on a second host at the same path (or one image on two hosts): the same
    # database id and path, so each daemon takes the other's claim for its own, and both synced
    # in silence, each audit deleting the other's documents; the refresh sees another daemon's
    # claim in place of its own
    claimed = Claims(db, [index])
    claimed(time.monotonic())
    mine = claim_of(served, index.collection)
    assert mine is not None
    theirs = mine | {"host": "other-host", "pid": 4242, "seen_at": int(time.time())}
    httpx.post(
        f"{served.url}/collections/{CLAIMS_COLLECTION}/documents?action=upsert",
        headers={"X-TYPESENSE-API-KEY": served.api_key},
        content=json.dumps(theirs),
    ).raise_for_status()
    with capture_logs() as logs:
        claimed(time.monotonic())
    shared = [log for log in logs if log["event"] == "claim_shared"]
    assert len(shared) == 1 and shared[0]["other"] == "pid 4242 on other-host"
    with capture_logs() as logs:
        claimed(time.monotonic())  # its own claim, as it just wrote it: nothing to say
    assert logs == []


def test_with_typesense_away_one_failed_request_keeps_every_claim(
    db: Database, index: TypesenseIndex, served: Server
) -> None:
    """Typesense away (a timeout each, 10 s by default): the claims' refresh, and their giving
    back at stop, waited for it once per collection; a stop with six passed systemd's
    TimeoutStopSec (found by a hostile review). One failed request stands for them all."""
    names = [f"{index.collection}_{n}" for n in range(3)]
    claimed = Claims(db, [index.on_collection(name) for name in names])
    claimed(time.monotonic())
    assert claimed.held == names
    away = TypesenseIndex([f"http://127.0.0.1:{free_port()}"], served.api_key, CLAIMS_COLLECTION)
    asked: list[str] = []
    away.observe = lambda operation, outcome, seconds: asked.append(outcome)
    claimed.claims = away
    with capture_logs() as logs:
        claimed(time.monotonic())  # a refresh
        claimed.give_back()
    assert asked == ["unavailable", "unavailable"]
    assert [(log["event"], log["collection"], log["also"]) for log in logs] == [
        ("claim_not_refreshed", names[0], names[1:]),
        ("claim_kept", names[0], names[1:]),
    ]
    assert all(running_claim(served, name) for name in names)  # stale in CLAIM_FRESH_S


def test_the_claims_are_given_back_after_the_other_jobs_stop(
    db: Database, index: TypesenseIndex
) -> None:
    """The owed audit and the statistics are saved first: giving the claims back asks a
    Typesense that may be away."""
    worker = daemon(db, [index], claims=True)
    stopped: list[str] = []
    for job in worker.jobs.values():
        if (then := job.at_stop) is not None:
            job.at_stop = lambda name=job.name, then=then: (stopped.append(name), then())
    worker.run(threading.Event(), once=True)
    assert stopped[-1] == "claims"
    assert {"audit", "stats"} <= set(stopped[:-1])


@pytest.mark.parametrize("failing", [0, 1])
def test_a_claim_that_fails_at_start_is_tried_at_the_next_turn(
    db: Database, db_path: Path, served: Server, collection: str, failing: int
) -> None:
    """A collection's claim answered 503 at start, the first's or the second's after the first
    was made: the loop waits, and its next turn claims again. It waited CLAIM_REFRESH_S (a
    minute) and synced the collection unclaimed meanwhile (found by a hostile review)."""
    names = [collection, f"{collection}_b"]
    app_connection(db_path).execute(ROW_SQL, make_row(1))
    with FaultProxy(served.url) as proxy:
        indexes = [TypesenseIndex([proxy.url], served.api_key, name) for name in names]
        for index in indexes:
            index.ensure_collection()
        worker = daemon(db, indexes, claims=True)
        worker.backoff.delay_s = 0.01
        path = f"/{CLAIMS_COLLECTION}/documents/{names[failing]}"
        proxy.add(Fault("status", status=503, path=path))
        assert worker.loop(time.monotonic(), threading.Event()).paused
        assert [running_claim(served, name) for name in names] == [failing == 1, False]
        worker.loop(time.monotonic(), threading.Event())
        assert proxy.pending_faults() == []
        assert all(running_claim(served, name) for name in names)
