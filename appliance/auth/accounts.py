"""Users, logins, browser sessions and API tokens, over the store; every change goes to the audit log.

Secrets are never stored or logged: passwords as scrypt hashes, session cookies and API tokens as their
SHA-256 (they are long random strings, so a fast hash is enough), and neither appears in the audit log.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from appliance.auth.errors import InvalidAccount, LoginFailed, NoUsersYet, TooManyAttempts
from appliance.auth.passwords import (
    PasswordPolicy,
    ScryptParams,
    check_password,
    dummy_hash,
    hash_password,
    needs_rehash,
    verify_password,
)
from appliance.auth.ratelimit import LoginLimiter
from appliance.logs import ThrottledLog
from appliance.store import ROLES, Language, NotFound, Role, SessionRecord, Store, TokenRecord, UserRecord

log = logging.getLogger(__name__)
_throttled = ThrottledLog(log)

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
TOKEN_PREFIX = "apl_"  # makes a leaked token recognisable to secret scanners and to people


@dataclass(frozen=True, slots=True)
class SessionLimits:
    lifetime_s: float = 12 * 3600.0  # seconds a login lasts (a shift and then some); then log in again
    token_touch_s: float = 60.0  # an API token's last_used is written at most this often (seconds)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who does something, and from where (a client address, or ``local`` for the CLI), for the audit log."""

    name: str
    address: str


@dataclass(frozen=True, slots=True)
class Principal:
    """The user a request acts as, and how it proved it: a browser session (which has a CSRF token) or an
    API token."""

    user: UserRecord
    via: Literal["session", "token"]
    session_hash: str | None = None
    csrf_token: str | None = None
    token_id: str | None = None

    @property
    def name(self) -> str:
        return self.user.name

    @property
    def role(self) -> Role:
        return self.user.role

    def allows(self, role: Role) -> bool:
        """Whether this user's role includes ``role`` (admin > operator > viewer)."""
        return ROLES.index(self.user.role) >= ROLES.index(role)

    def actor(self, address: str) -> Actor:
        return Actor(self.user.name, address)


@dataclass(frozen=True, slots=True)
class NewSession:
    """A session just created by a login: ``cookie`` is its secret, sent to the browser and kept nowhere."""

    cookie: str
    csrf_token: str
    expires: float
    user: UserRecord


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_user_name(name: str) -> None:
    if not USER_NAME.match(name):
        raise InvalidAccount(f"user name {name[:80]!r} is not allowed: use 1 to 64 letters, digits and . _ @ -, "
                             "starting with a letter or digit", field="name")


class Accounts:
    """The one place users are added, changed and removed, and credentials are checked.

    Blocking (scrypt, SQLite): call from asyncio through a thread. ``clock`` is wall-clock seconds.
    """

    def __init__(self, store: Store, *, scrypt: ScryptParams | None = None, policy: PasswordPolicy | None = None,
                 limiter: LoginLimiter | None = None, sessions: SessionLimits | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.scrypt = scrypt or ScryptParams()
        self.policy = policy or PasswordPolicy()
        self.limiter = limiter or LoginLimiter()
        self.sessions = sessions or SessionLimits()
        self._clock = clock

    # users

    def add_user(self, name: str, role: Role, password: str, by: Actor, language: Language = "en") -> UserRecord:
        check_user_name(name)
        check_password(password, name, self.policy)
        user = self.store.users.add(name, role, hash_password(password, self.scrypt), language)
        self.store.audit_log.add(by.name, "user.add", {"user": user.name, "role": role, "language": language},
                                 by.address)
        log.info("user %s added (%s) by %s from %s", user.name, role, by.name, by.address)
        return user

    def update_user(self, name: str, by: Actor, *, role: Role | None = None, language: Language | None = None,
                    disabled: bool | None = None, password: str | None = None,
                    keep_session: str | None = None) -> UserRecord:
        """Change a user; a new password or disabling ends their other sessions (``keep_session``: the
        session hash of the caller changing their own password, which stays)."""
        if role is None and language is None and disabled is None and password is None:
            current = self.store.users.get(name)
            if current is None:
                raise NotFound(f"no user named {name!r}")
            return current  # nothing to change, nothing to audit
        new_hash = None
        if password is not None:
            check_password(password, name, self.policy)
            new_hash = hash_password(password, self.scrypt)
        user = self.store.users.update(name, role=role, language=language, disabled=disabled, password_hash=new_hash,
                                       end_sessions=password is not None, keep_session=keep_session)
        changes: dict[str, object] = {k: v for k, v in (("role", role), ("language", language),
                                                         ("disabled", disabled)) if v is not None}
        if password is not None:
            changes["password"] = "changed"
        self.store.audit_log.add(by.name, "user.update", {"user": user.name, "changes": changes}, by.address)
        return user

    def change_own_password(self, principal: Principal, current: str, new: str, address: str) -> UserRecord:
        """Change one's own password, which needs the current one (a failure counts like a failed login)."""
        try:
            attempt = self.limiter.begin(principal.name, address)
        except TooManyAttempts as e:
            self._refused(e, principal.name, address)
            raise
        if not verify_password(current, principal.user.password_hash):
            self.store.audit_log.add(principal.name, "user.password.failed", {"user": principal.name}, address)
            raise LoginFailed("the current password is wrong; nothing was changed")
        self.limiter.withdraw(attempt)
        return self.update_user(principal.name, principal.actor(address), password=new,
                                keep_session=principal.session_hash)

    def remove_user(self, name: str, by: Actor) -> UserRecord:
        user = self.store.users.remove(name)
        self.store.audit_log.add(by.name, "user.remove", {"user": user.name, "role": user.role}, by.address)
        log.info("user %s removed by %s from %s", user.name, by.name, by.address)
        return user

    # logins and sessions

    def login(self, name: str, password: str, address: str) -> NewSession:
        """Check a password and start a session. Raises :class:`TooManyAttempts`, :class:`NoUsersYet` or
        :class:`LoginFailed` (the same message for an unknown user and a wrong password)."""
        try:
            attempt = self.limiter.begin(name, address)  # counted as a failure until the password proves right
        except TooManyAttempts as e:
            self._refused(e, name, address)
            raise
        if self.store.users.count() == 0:
            self.limiter.withdraw(attempt)
            raise NoUsersYet()
        user = self.store.users.get(name)
        ok = verify_password(password, user.password_hash if user else dummy_hash(self.scrypt))
        if user is None or not ok:
            # an unknown name is not recorded: it is often a password typed into the wrong field
            who = user.name if user else "(unknown user)"
            log.warning("login failed for %s from %s (%d of %d allowed in %.0f s)", who, address, attempt.failures,
                        self.limiter.limits.per_user_address, self.limiter.limits.window_s)
            self.store.audit_log.add(who, "login.failed", {"reason": "wrong password" if user else "unknown user"},
                                     address)
            raise LoginFailed("wrong user name or password")
        self.limiter.withdraw(attempt)  # the right password, even for a disabled account, is no guess
        if user.disabled:
            self.store.audit_log.add(user.name, "login.failed", {"reason": "account disabled"}, address)
            raise LoginFailed(f"the account {user.name} is disabled; ask an admin to enable it")
        self.limiter.succeeded(name, address)
        if needs_rehash(user.password_hash, self.scrypt):
            user = self.store.users.update(user.name, password_hash=hash_password(password, self.scrypt))
        cookie, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), self._clock()
        expires = now + self.sessions.lifetime_s
        self.store.sessions.add(SessionRecord(_sha256(cookie), user.name, csrf, now, expires, address))
        self.store.audit_log.add(user.name, "login", {"role": user.role}, address)
        log.info("user %s logged in from %s", user.name, address)
        return NewSession(cookie, csrf, expires, user)

    def _refused(self, e: TooManyAttempts, name: str, address: str) -> None:
        """Log a refusal at most once a minute per limit (the log line counts the others)."""
        limits = self.limiter.limits
        if e.cause == "user":
            user = self.store.users.get(name)  # a name that is no user is not logged: it may be a password
            _throttled.warning(
                ("login-limited", e.cause),
                "login refused for %s from %s: that name has had %d or more failed logins from many addresses in "
                "%.0f s, so addresses that failed for it are held back (others still reach the password check)",
                user.name if user else "(unknown user)", address, limits.per_user, limits.window_s)
        else:
            _throttled.warning(("login-limited", e.cause), "login refused from %s: too many failed attempts (%s)",
                               address, "for one name from there" if e.cause == "user+address" else "for any names")

    def session(self, cookie: str) -> Principal | None:
        """The principal of a session cookie, or None if it is unknown, expired or its user disabled."""
        found = self.store.sessions.get(_sha256(cookie))
        if found is None:
            return None
        session, user = found
        if session.expires <= self._clock() or user.disabled:
            return None
        return Principal(user, "session", session_hash=session.id_hash, csrf_token=session.csrf_token)

    def logout(self, principal: Principal, address: str) -> None:
        if principal.session_hash is not None:
            self.store.sessions.remove(principal.session_hash)
        self.store.audit_log.add(principal.name, "logout", {}, address)

    # API tokens

    def create_token(self, user: str, name: str, by: Actor) -> tuple[TokenRecord, str]:
        """A new API token for ``user``: the record, and the secret, which is shown once and kept nowhere."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        owner = self.store.users.get(user)
        record = TokenRecord(secrets.token_hex(6), name, owner.name if owner else user, _sha256(secret),
                             self._clock())
        self.store.tokens.add(record)
        self.store.audit_log.add(by.name, "token.create", {"token": record.id, "name": name, "user": record.user},
                                 by.address)
        return record, secret

    def revoke_token(self, token_id: str, by: Actor) -> TokenRecord:
        record = self.store.tokens.remove(token_id)
        self.store.audit_log.add(by.name, "token.revoke",
                                 {"token": record.id, "name": record.name, "user": record.user}, by.address)
        return record

    def token(self, secret: str) -> Principal | None:
        """The principal of an API token, or None if it is unknown (revoked) or its user disabled."""
        found = self.store.tokens.find(_sha256(secret))
        if found is None:
            return None
        token, user = found
        if user.disabled:
            return None
        now = self._clock()
        if token.last_used is None or now - token.last_used >= self.sessions.token_touch_s:
            self.store.tokens.touch(token.id, now)
        return Principal(user, "token", token_id=token.id)
