"""Accounts and security as a library, on real SQLite: hashes, policy, rate limits, sessions, tokens, the
store's new tables."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from appliance.auth import (
    Accounts,
    Actor,
    InvalidAccount,
    LoginFailed,
    LoginLimiter,
    LoginLimits,
    NoUsersYet,
    ScryptParams,
    SessionLimits,
    TooManyAttempts,
    check_password,
    hash_password,
    needs_rehash,
    verify_password,
)
from appliance.http.security import SESSION_COOKIE
from appliance.store import EventRecord, LastAdmin, NotFound, Store, UserExists
from tests.apiserver import ApiServer

FAST = ScryptParams(log2_n=10)
CLI = Actor("cli", "local")


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as s:
        yield s


# ---- passwords ------------------------------------------------------------------------------------------


def test_hash_is_salted_self_describing_and_verifies() -> None:
    a, b = hash_password("a long pass phrase", FAST), hash_password("a long pass phrase", FAST)
    assert a != b, "a new salt each time"
    assert a.startswith("scrypt$ln=10,r=8,p=1$")
    assert verify_password("a long pass phrase", a) and verify_password("a long pass phrase", b)
    assert not verify_password("a long pass phrasE", a)
    assert not verify_password("a long pass phrase", "scrypt$ln=10,r=8,p=1$broken")
    assert not verify_password("a long pass phrase", "md5$whatever")
    assert needs_rehash(a, ScryptParams()) and not needs_rehash(a, FAST)


def test_default_cost_is_the_documented_one() -> None:
    encoded = hash_password("a long pass phrase")
    assert encoded.startswith("scrypt$ln=15,r=8,p=1$") and verify_password("a long pass phrase", encoded)
    assert ScryptParams().memory_bytes >= 32 * 1024 * 1024


@pytest.mark.parametrize(("password", "why"), [
    ("short", "at least 10"),
    ("ward-sister-2026", "user name"),
    ("WARD-SISTERxxxx", "user name"),
    ("1234567890", "guess"),
    ("aaaaaaaaaaaa", "guess"),
    ("          ", "spaces"),
    ("x" * 1025, "at most 1024"),
])
def test_password_policy(password: str, why: str) -> None:
    with pytest.raises(InvalidAccount, match=why):
        check_password(password, "ward-sister")


def test_password_policy_accepts_a_pass_phrase() -> None:
    check_password("night shift on ward 7", "ward-sister")
    check_password("an ok phrase", "a")  # a one-letter name is not looked for inside the password


# ---- rate limits ------------------------------------------------------------------------------------------


def test_limiter_counts_per_user_and_address_over_a_window() -> None:
    clock = Clock(100.0)
    limiter = LoginLimiter(LoginLimits(window_s=300, per_user_address=5), clock)
    for i in range(5):
        limiter.check("Nurse", "10.0.0.7")
        assert limiter.failed("nurse", "10.0.0.7") == i + 1, "names compare without case"
        clock.now += 10
    with pytest.raises(TooManyAttempts) as e:
        limiter.check("nurse", "10.0.0.7")
    assert e.value.retry_after_s == 300 - 50  # until the first failure leaves the window
    limiter.check("nurse", "10.0.0.8")  # another address
    limiter.check("doctor", "10.0.0.7")  # another user from the same address
    clock.now += 251
    limiter.check("nurse", "10.0.0.7")


def test_limiter_success_forgets_only_the_users_own_failures() -> None:
    limiter = LoginLimiter(LoginLimits(per_user_address=3, per_address=6), Clock())
    for name in ("a", "b", "c", "nurse"):
        limiter.failed(name, "10.0.0.7")
    limiter.failed("nurse", "10.0.0.7")
    limiter.succeeded("nurse", "10.0.0.7")
    limiter.check("nurse", "10.0.0.7")
    limiter.failed("d", "10.0.0.7")
    with pytest.raises(TooManyAttempts, match="from 10.0.0.7"):
        limiter.check("nurse", "10.0.0.7")  # the address's count was not reset by the success


def test_limiter_holds_back_only_addresses_that_failed_for_a_guessed_name() -> None:
    clock = Clock(100.0)
    limiter = LoginLimiter(LoginLimits(window_s=300, per_user=3, guessed_window_s=900), clock)
    for i in range(3):
        limiter.failed("boss", f"10.0.0.{i}")
    limiter.check("boss", "10.0.0.99")  # an address that never failed for the name still reaches the password check
    limiter.check("doctor", "10.0.0.0")  # the same address for another name
    with pytest.raises(TooManyAttempts, match="for 'boss' from 10.0.0.0 while that name is being guessed") as e:
        limiter.check("boss", "10.0.0.0")
    assert e.value.cause == "user" and e.value.retry_after_s == 300, "until the guessing from everywhere ages out"
    clock.now += 200
    limiter.failed("boss", "10.0.0.99")  # the guessing goes on: the name stays guessed past the first window
    limiter.failed("boss", "10.0.0.98")
    limiter.failed("boss", "10.0.0.97")
    clock.now += 150
    with pytest.raises(TooManyAttempts, match="being guessed") as e:
        limiter.check("boss", "10.0.0.0")  # its own failure is 350 s old: out of the window, held all the same
    assert e.value.retry_after_s == 300 - 150
    clock.now += 150
    limiter.check("boss", "10.0.0.0")  # the guessing stopped: back to the plain budget


def test_limiter_memory_is_bounded_and_expires() -> None:
    clock = Clock(100.0)
    limiter = LoginLimiter(LoginLimits(window_s=300, guessed_window_s=900, max_tracked=30), clock)
    for i in range(1000):
        limiter.failed(f"random{i}", f"10.1.{i // 250}.{i % 250}")
    assert limiter.tracked() <= 3 * 30
    for i in range(200):
        limiter.failed("boss", f"10.2.0.{i}")  # one name from many addresses: its count keeps the newest only
    assert len(limiter._user._times["boss"]) == limiter.limits.per_user
    clock.now += 901
    limiter.failed("nurse", "10.0.0.7")
    assert limiter.tracked() == 3, "what aged out of its window is dropped"


def test_limiter_begin_counts_before_the_check_of_the_password() -> None:
    limiter = LoginLimiter(LoginLimits(per_user_address=3, per_address=20), Clock())
    attempts = [limiter.begin("nurse", "10.0.0.7") for _ in range(3)]
    assert [a.failures for a in attempts] == [1, 2, 3]
    with pytest.raises(TooManyAttempts) as e:
        limiter.begin("nurse", "10.0.0.7")  # concurrent guesses are counted before any hash is done
    assert e.value.cause == "user+address"
    limiter.withdraw(attempts[-1])  # that one was the right password
    assert limiter.begin("nurse", "10.0.0.7").failures == 3


def test_limits_refuse_a_zero_that_would_refuse_everyone() -> None:
    with pytest.raises(ValueError, match="per_user_address_guessed must be at least 1"):
        LoginLimits(per_user_address_guessed=0)


# ---- rate limits over real HTTP, with the attacker on loopback aliases (127.0.0.0/8 is all loopback) -----


@dataclass
class Door:
    """The real HTTP app with the default limits, on a clock the test moves instead of sleeping, and a
    client per source address (each bound to its loopback alias)."""

    api: ApiServer
    clock: Clock
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    def login(self, address: str, user: str, password: str) -> httpx.Response:
        if address not in self.clients:
            self.clients[address] = self.api.client(local_address=address)
        return self.clients[address].post("/api/v1/login", json={"user": user, "password": password})


@pytest.fixture
def door(tmp_path: Path) -> Iterator[Door]:
    api = ApiServer(tmp_path / "state")
    clock = Clock(1000.0)
    api.accounts.limiter = LoginLimiter(LoginLimits(), clock)  # the server's own accounts, on the test's clock
    made = Door(api, clock)
    yield made
    for c in made.clients.values():
        c.close()
    api.stop()


def failed_logins(api: ApiServer) -> int:
    return sum(1 for a in api.store.audit_log.recent(1000) if a.action == "login.failed")


def test_guessing_from_many_addresses_does_not_lock_the_admin_out(door: Door) -> None:
    api = door.api
    password = api.add_user("boss", "admin")
    attackers = [f"127.0.1.{i}" for i in range(1, 11)]
    for address in attackers:
        for _ in range(5):
            assert door.login(address, "boss", "guess-guess-guess").status_code == 401
    assert failed_logins(api) == 50
    for address in attackers:
        r = door.login(address, "boss", password)
        assert r.status_code == 429, "each attacker address has spent its own budget, even for the right password"

    r = door.login("127.0.0.2", "boss", password)
    assert r.status_code == 200, "the admin's own address, which never failed, still gets in"
    assert door.login("127.0.2.1", "boss", password).status_code == 200, "and so does a fresh address"
    with api.client(local_address="127.0.2.2") as c:
        r = c.post("/login", data={"user": "boss", "password": password, "next": "/"})
        assert r.status_code == 303 and SESSION_COOKIE in r.cookies, "and the console's login form"


def test_an_address_that_keeps_guessing_stays_held_and_guessing_stays_bounded(
        door: Door, caplog: pytest.LogCaptureFixture) -> None:
    api, clock = door.api, door.clock
    password = api.add_user("boss", "admin")
    first = [f"127.0.1.{i}" for i in range(1, 11)]
    for address in first:
        for _ in range(5):
            assert door.login(address, "boss", "guess-guess-guess").status_code == 401

    clock.now += 100  # a second wave from 50 new addresses, 2 guesses each
    second = [f"127.0.3.{i}" for i in range(1, 51)]
    outcomes = Counter(door.login(address, "boss", f"guess {i}").status_code
                       for address in second for i in range(2))
    assert outcomes == {401: 50, 429: 50}, "past the per-user threshold, one guess per address, not five"
    assert failed_logins(api) == 50 + 50
    r = door.login(second[0], "boss", password)
    assert r.status_code == 429 and "being guessed from many addresses" in r.json()["error"]
    assert 0 < int(r.headers["retry-after"]) <= 900

    clock.now += 250  # the first wave is out of the 5-minute window, and the name is still being guessed
    for address in first:
        r = door.login(address, "boss", password)
        assert r.status_code == 429, "an address that failed stays held while the guessing goes on"
    assert door.login("127.0.0.2", "boss", password).status_code == 200, "one that never failed is not"
    assert door.login("127.0.2.3", "boss", "a typo of the password").status_code == 401
    assert door.login("127.0.2.3", "boss", password).status_code == 429, \
        "the price: one failure of its own during the guessing holds an address back too"

    clock.now += 301  # the guessing stopped: every failure is out of the window
    assert door.login(first[0], "boss", password).status_code == 200

    messages = [r.getMessage() for r in caplog.records if r.name.startswith("appliance")]
    refused = Counter(m.split(":")[0].split(" from ")[0] for m in messages if m.startswith("login refused"))
    assert all(n <= 1 for n in refused.values()), f"refusals are logged at most once a minute per limit: {refused}"
    assert not [m for m in messages if password in m or "guess 1" in m], "no password in the log"


def test_concurrent_guesses_from_one_address_are_counted_before_the_hash(door: Door) -> None:
    api = door.api
    api.add_user("boss", "admin")
    start = threading.Barrier(20)

    def guess(i: int) -> int:
        with api.client(local_address="127.0.5.1") as c:
            start.wait(10)
            return c.post("/api/v1/login", json={"user": "boss", "password": f"guess {i}"}).status_code

    with ThreadPoolExecutor(20) as pool:
        codes = Counter(pool.map(guess, range(20)))
    assert codes == {401: 5, 429: 15}, "twenty guesses at once get the budget of five, not twenty"


# ---- accounts ---------------------------------------------------------------------------------------------


def test_no_login_before_the_first_user(store: Store) -> None:
    accounts = Accounts(store, scrypt=FAST)
    with pytest.raises(NoUsersYet, match="appliance users add NAME --role admin"):
        accounts.login("admin", "admin", "10.0.0.7")


def test_login_session_and_logout(store: Store) -> None:
    clock = Clock()
    accounts = Accounts(store, scrypt=FAST, clock=clock, sessions=SessionLimits(lifetime_s=3600))
    accounts.add_user("Boss", "admin", "a long pass phrase", CLI, "zh")
    session = accounts.login("boss", "a long pass phrase", "10.0.0.7")
    assert session.user.name == "Boss" and session.expires == clock.now + 3600
    principal = accounts.session(session.cookie)
    assert principal is not None and principal.name == "Boss" and principal.csrf_token == session.csrf_token
    assert principal.allows("viewer") and principal.allows("admin")
    stored = store.sessions.get(principal.session_hash or "")
    assert stored is not None and stored[0].address == "10.0.0.7" and session.cookie not in repr(stored)
    clock.now += 3601
    assert accounts.session(session.cookie) is None, "expired"
    clock.now -= 2
    accounts.logout(principal, "10.0.0.7")
    assert accounts.session(session.cookie) is None, "logged out"
    assert accounts.session("made-up") is None
    with pytest.raises(LoginFailed, match="wrong user name or password"):
        accounts.login("boss", "a long pass phrasE", "10.0.0.7")
    with pytest.raises(LoginFailed, match="wrong user name or password"):
        accounts.login("nobody", "a long pass phrase", "10.0.0.7")


def test_login_upgrades_an_old_hash(store: Store) -> None:
    Accounts(store, scrypt=FAST).add_user("boss", "admin", "a long pass phrase", CLI)
    stronger = ScryptParams(log2_n=11)
    Accounts(store, scrypt=stronger).login("boss", "a long pass phrase", "10.0.0.7")
    user = store.users.get("boss")
    assert user is not None and not needs_rehash(user.password_hash, stronger)


def test_roles_and_the_last_admin(store: Store) -> None:
    accounts = Accounts(store, scrypt=FAST)
    accounts.add_user("boss", "admin", "a long pass phrase", CLI)
    with pytest.raises(UserExists):
        accounts.add_user("BOSS", "viewer", "another long phrase", CLI)
    with pytest.raises(LastAdmin, match="last enabled admin"):
        accounts.remove_user("boss", CLI)
    with pytest.raises(LastAdmin):
        accounts.update_user("boss", CLI, role="operator")
    with pytest.raises(LastAdmin):
        accounts.update_user("boss", CLI, disabled=True)
    accounts.add_user("deputy", "admin", "a long pass phrase 2", CLI)
    accounts.update_user("boss", CLI, disabled=True)
    with pytest.raises(LastAdmin):
        accounts.remove_user("deputy", CLI)
    with pytest.raises(NotFound):
        accounts.remove_user("ghost", CLI)
    with pytest.raises(InvalidAccount, match="not allowed"):
        accounts.add_user("bad name", "viewer", "a long pass phrase", CLI)


def test_tokens(store: Store) -> None:
    clock = Clock()
    accounts = Accounts(store, scrypt=FAST, clock=clock, sessions=SessionLimits(token_touch_s=60))
    accounts.add_user("boss", "admin", "a long pass phrase", CLI)
    accounts.add_user("vms", "viewer", "a long pass phrase", CLI)
    record, secret = accounts.create_token("vms", "video wall", CLI)
    assert secret.startswith("apl_") and len(secret) > 40
    assert secret not in repr(record) and record.token_hash not in repr(record)
    principal = accounts.token(secret)
    assert principal is not None and principal.name == "vms" and principal.via == "token"
    assert principal.csrf_token is None and not principal.allows("operator")
    assert store.tokens.all()[0].last_used == clock.now
    clock.now += 30
    accounts.token(secret)
    assert store.tokens.all()[0].last_used == clock.now - 30, "written at most once a minute"
    accounts.revoke_token(record.id, CLI)
    assert accounts.token(secret) is None
    with pytest.raises(NotFound):
        accounts.create_token("ghost", "x", CLI)
    record, secret = accounts.create_token("vms", "again", CLI)
    accounts.remove_user("vms", CLI)
    assert accounts.token(secret) is None and store.tokens.all() == [], "a removed user's tokens go with them"


def test_secrets_are_not_stored_in_clear(store: Store, tmp_path: Path) -> None:
    accounts = Accounts(store, scrypt=FAST)
    accounts.add_user("boss", "admin", "the chief's pass phrase", CLI)
    session = accounts.login("boss", "the chief's pass phrase", "10.0.0.7")
    _, token = accounts.create_token("boss", "x", CLI)
    with pytest.raises(LoginFailed):
        accounts.login("boss", "a mistyped pass phrase", "10.0.0.7")
    store.close()
    data = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    for secret in ("the chief's pass phrase", "a mistyped pass phrase", session.cookie, token):
        assert secret.encode() not in data


# ---- the store's tables -------------------------------------------------------------------------------


def test_handling_goes_with_its_event(store: Store) -> None:
    store.events.add(EventRecord("e1", 1000.0, "app", "cam1", "rule", "person", 0.9))
    store.events.add(EventRecord("e2", 5000.0, "app", "cam1", "rule", "person", 0.9))
    first = store.handling.add("e1", "acknowledged", "nurse", "")
    store.handling.add("e1", "note", "doctor", "checked")
    store.handling.add("e2", "false_positive", "nurse", "shadow")
    assert first.user == "nurse" and first.ts > 0
    handling = store.handling.for_events(["e1", "e2", "e3"])
    assert [(h.action, h.user, h.note) for h in handling["e1"]] == [("acknowledged", "nurse", ""),
                                                                    ("note", "doctor", "checked")]
    assert "e3" not in handling
    with pytest.raises(NotFound):
        store.handling.add("e3", "note", "nurse", "")
    with pytest.raises(ValueError, match="one of"):
        store.handling.add("e1", "shrug", "nurse", "")  # type: ignore[arg-type]
    store.events.prune(older_than_ts=2000.0, max_snapshot_bytes=10**9)
    assert list(store.handling.for_events(["e1", "e2"])) == ["e2"]


def test_schema_refuses_what_the_code_would_never_write(store: Store) -> None:
    conn = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO users (name, role, password_hash, created) VALUES ('x', 'root', 'h', 0)")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO users (name, role, password_hash, language, created) "
                     "VALUES ('x', 'viewer', 'h', 'fr', 0)")
    conn.close()


def test_migration_3_keeps_what_a_version_2_database_holds(tmp_path: Path) -> None:
    from appliance.store import MIGRATIONS

    path = tmp_path / "old.db"
    with Store(path, migrations=MIGRATIONS[:2]) as old:
        old.events.add(EventRecord("e1", 1000.0, "app", "cam1", "rule", "person", 0.9))
    conn = sqlite3.connect(path)  # as the previous version wrote it: no address column yet
    conn.execute("""INSERT INTO audit_log (ts, actor, action, detail) VALUES (1, 'cli', 'app.install', '{}')""")
    conn.commit()
    conn.close()
    with Store(path) as new:
        line = new.audit_log.recent(1)[0]
        assert (line.actor, line.action, line.address) == ("cli", "app.install", None)
        assert new.handling.add("e1", "acknowledged", "nurse").event_id == "e1"
        new.audit_log.add("nurse", "event.handle", {"event": "e1"}, "10.0.0.7")
        assert new.audit_log.recent(1)[0].address == "10.0.0.7"
        assert new.users.count() == 0
