"""The login limiter (``consult_web.auth.LoginLimiter``) with an injected clock, on a real database.

Its failures live in the ``login_failures`` table, so several web processes (here: several
limiters, or apps, on one database) count each other's failures.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from consult_web.auth import LoginLimiter
from xray_triage.store.consult_schema import LoginFailure
from xray_triage.store.db import Database


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.create_schema()
    yield database
    database.dispose()


def _rows(db: Database) -> list[tuple[str, str]]:
    with db.read_session() as session:
        return [tuple(row) for row in session.execute(select(LoginFailure.username, LoginFailure.network))]


class FakeClock:
    """A monotonic clock the test moves by hand: limiter tests never sleep or race a window."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_login_limiter_forgets_old_failures(db: Database) -> None:
    clock = FakeClock()
    limiter = LoginLimiter(db, max_failures=2, window_s=60, clock=clock)
    for n in range(200):
        assert limiter.retry_after(f"user{n}", "10.0.0.1") == 0  # looking up creates nothing
    limiter.failed("an", "10.0.0.2")
    limiter.failed("an", "10.0.0.2")
    assert limiter.retry_after("AN", "10.0.0.2") == 60  # user names are case-insensitive
    clock.now += 59.5
    assert limiter.retry_after("an", "10.0.0.2") == 0.5  # locked until the oldest failure leaves the window
    clock.now += 0.5
    assert limiter.retry_after("an", "10.0.0.2") == 0
    for n in range(600):  # a spray of one failure per name and address, however long it takes to run
        limiter.failed(f"spray{n}", f"10.1.{n // 250}.{n % 250}")
    clock.now += 60
    limiter.failed("last", "10.9.9.9")
    assert _rows(db) == [("last", "10.9.9.9")]  # the failures that left the window are pruned


def test_a_stranger_cannot_lock_a_user_out_from_elsewhere(db: Database) -> None:
    limiter = LoginLimiter(db, max_failures=3, window_s=60, clock=FakeClock())
    for _ in range(3):
        limiter.failed("bs.lan", "203.0.113.7")  # someone types wrong passwords for her
    assert limiter.retry_after("bs.lan", "203.0.113.7") > 0  # that address is stopped at once
    assert limiter.retry_after("bs.lan", "10.20.0.5") == 0  # she can still log in from her hospital
    # One address trying many names is bounded by the per-network limit (4 x 3 failures).
    for n in range(12):
        limiter.failed(f"name{n}", "192.0.2.1")
    assert limiter.retry_after("someone.else", "192.0.2.1") > 0
    assert limiter.retry_after("someone.else", "192.0.2.2") == 0
    # A successful login clears that user's failures from that network only.
    limiter.succeeded("bs.lan", "203.0.113.7")
    assert limiter.retry_after("bs.lan", "203.0.113.7") == 0


def test_twenty_addresses_cannot_lock_a_user_out_of_her_own_network(db: Database) -> None:
    clock = FakeClock()
    limiter = LoginLimiter(db, max_failures=5, window_s=900, backoff_s=1.0, clock=clock)
    limiter.succeeded("bs.hoa", "10.20.0.5")  # she works from her hospital's network
    limiter.succeeded("bs.hoa", "2001:db8:aa:1::10")  # and from home, over IPv6
    for n in range(40):  # strangers fail for her from 40 addresses, two tries a second
        limiter.failed("bs.hoa", f"198.51.100.{n}")
        clock.now += 0.5
    assert limiter.retry_after("bs.hoa", "10.20.0.5") == 0
    assert limiter.retry_after("bs.hoa", "2001:db8:aa:1::99") == 0  # any address of her home /64
    assert limiter.retry_after("bs.hoa", "198.51.100.250") > 0  # a new address of theirs must wait


def test_guessing_one_name_from_many_networks_backs_off_exponentially(db: Database) -> None:
    clock = FakeClock()
    limiter = LoginLimiter(db, max_failures=5, window_s=900, backoff_s=1.0, clock=clock)
    for n in range(20):  # 4 x max_failures from 20 networks: no wait yet
        assert limiter.retry_after("bs.hoa", f"198.51.100.{n}") == 0
        limiter.failed("bs.hoa", f"198.51.100.{n}")
    waits = []
    attacker = 0
    while clock.now < 1000.0 + 900:  # the attacker tries as soon as allowed, from a new network each time
        attacker += 1
        ip = f"203.0.{attacker // 250}.{attacker % 250}"
        wait = limiter.retry_after("bs.hoa", ip)
        if wait > 0:
            waits.append(wait)
            clock.now += wait
        assert limiter.retry_after("bs.hoa", ip) == 0
        limiter.failed("bs.hoa", ip)
    assert waits[:6] == [1, 2, 4, 8, 16, 32]
    assert 20 + len(waits) < 35  # guesses in the 15 minutes (20 before any wait): 900 without the back-off


def test_ipv6_addresses_of_one_64_count_as_one_network(db: Database) -> None:
    limiter = LoginLimiter(db, max_failures=5, window_s=900, clock=FakeClock())
    for n in range(5):  # five addresses of one /64: one network
        limiter.failed("bs.hoa", f"2001:db8:1:2::{n + 1:x}")
    assert limiter.retry_after("bs.hoa", "2001:db8:1:2:ffff::1") > 0
    assert limiter.retry_after("bs.hoa", "2001:db8:1:3::1") == 0  # the next /64 is another network
    for n in range(20):  # a name spray from one /64
        limiter.failed(f"name{n}", f"2001:db8:9:9::{n + 1:x}")
    assert limiter.retry_after("someone.else", "2001:db8:9:9:abcd::1") > 0
    assert limiter.network("::ffff:192.0.2.7") == "192.0.2.7"  # an IPv4-mapped address is its IPv4


def test_two_limiters_on_one_database_count_each_others_failures(db: Database) -> None:
    """Two web processes (two limiters, one database): failures spread over both add up."""
    clock = FakeClock()
    first = LoginLimiter(db, max_failures=5, window_s=900, clock=clock)
    second = LoginLimiter(db, max_failures=5, window_s=900, clock=clock)
    for n in range(5):  # 3 through one process, 2 through the other
        limiter = first if n % 2 == 0 else second
        assert limiter.retry_after("bs.hoa", "198.51.100.7") == 0
        limiter.failed("bs.hoa", "198.51.100.7")
        clock.now += 1
    assert first.retry_after("bs.hoa", "198.51.100.7") == 900 - 5  # until the first failure leaves the window
    assert second.retry_after("BS.HOA", "198.51.100.7") == 900 - 5
    second.succeeded("bs.hoa", "198.51.100.7")  # she logs in through the other process: cleared for both
    assert first.retry_after("bs.hoa", "198.51.100.7") == 0
    # The network limit is shared too: a name spray over both processes.
    for n in range(20):
        (first if n % 2 else second).failed(f"name{n}", "192.0.2.1")
    assert first.retry_after("someone.else", "192.0.2.1") > 0
    assert second.retry_after("someone.else", "192.0.2.1") > 0
    first.reset()  # an admin's reset clears every process's count
    assert second.retry_after("someone.else", "192.0.2.1") == 0 and _rows(db) == []


def test_a_network_learned_by_another_process_exempts_it_from_the_back_off(db: Database) -> None:
    """She logs in through process B; strangers hammer her name through process A, which was already
    running (its start-up read of the audit log did not see that login): A still lets her in."""
    from xray_triage.store.consult_schema import AuditEvent

    clock = FakeClock()
    first = LoginLimiter(db, max_failures=5, window_s=900, clock=clock)
    second = LoginLimiter(db, max_failures=5, window_s=900, clock=clock)
    with db.session() as session:  # what the login route writes in process B's transaction
        session.add(AuditEvent(action="login", username="BS.Hoa", ip="2001:db8:77:1::5"))
        second.succeeded("BS.Hoa", "2001:db8:77:1::5", session)
    for n in range(20):
        first.failed("bs.hoa", f"198.51.100.{n}")
    assert first.retry_after("bs.hoa", "198.51.100.250") > 0  # a stranger's next address waits
    assert first.retry_after("bs.hoa", "2001:db8:77:1::9") == 0  # her home /64, learned from the audit log


def test_checking_and_a_clean_login_never_wait_for_the_sqlite_write_lock(db: Database) -> None:
    """While another process holds SQLite's write lock (a long ingest transaction), checking the
    limit and a successful login with no failures to clear still answer: they only read."""
    import sqlite3

    from db_helpers import on_postgres

    if on_postgres():
        pytest.skip("SQLite's database-wide write lock only")
    clock = FakeClock()
    limiter = LoginLimiter(db, max_failures=2, window_s=60, clock=clock)
    limiter.failed("an", "10.0.0.2")
    writer = sqlite3.connect(db.engine.url.database, timeout=0, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the write lock, held by "another process"
    try:
        assert limiter.retry_after("an", "10.0.0.2") == 0
        limiter.succeeded("bs.hoa", "10.20.0.5")  # nothing to clear: no write
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    limiter.succeeded("an", "10.0.0.2")  # something to clear: written once the lock is free
    assert _rows(db) == []
