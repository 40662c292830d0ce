"""``store.users``, ``store.sessions``, ``store.tokens``: the console's users, their login sessions and their
API tokens (hashes only). A session and a token belong to a user and go when the user does."""

from __future__ import annotations

from sqlite_utils import Database

from appliance.store._table import Table, select
from appliance.store.errors import LastAdmin, NotFound, UserExists
from appliance.store.records import (
    LANGUAGES,
    ROLES,
    Language,
    Role,
    SessionRecord,
    TokenRecord,
    UserRecord,
    session_from_row,
    token_from_row,
    user_from_row,
)


class Users(Table):
    def add(self, name: str, role: Role, password_hash: str, language: Language = "en") -> UserRecord:
        """Add a console user. Raises :class:`UserExists` if the name (compared without case) is taken."""
        _check_user_fields(role, language)
        created = self._clock()

        def write(db: Database) -> UserRecord:
            if select(db, "SELECT 1 FROM users WHERE name = ?", (name,)):
                raise UserExists(name)
            db.execute(
                "INSERT INTO users (name, role, password_hash, language, created, disabled) VALUES (?, ?, ?, ?, ?, 0)",
                (name, role, password_hash, language, created),
            )
            return UserRecord(name, role, password_hash, language, created, False)

        return self._write(write)

    def get(self, name: str) -> UserRecord | None:
        """The user of that name, compared without case."""
        return self._read(lambda db: _user(db, name))

    def all(self) -> list[UserRecord]:
        rows = self._read(lambda db: select(db, "SELECT * FROM users ORDER BY name"))
        return [user_from_row(r) for r in rows]

    def count(self) -> int:
        rows = self._read(lambda db: select(db, "SELECT count(*) AS n FROM users"))
        return int(rows[0]["n"])

    def update(
        self,
        name: str,
        *,
        role: Role | None = None,
        password_hash: str | None = None,
        language: Language | None = None,
        disabled: bool | None = None,
        end_sessions: bool = False,
        keep_session: str | None = None,
    ) -> UserRecord:
        """Change a user and return the new record; with ``end_sessions`` also end their sessions (all but
        the one whose hash is ``keep_session``) in the same transaction.

        Raises :class:`NotFound`, and :class:`LastAdmin` if no enabled admin would be left.
        """
        _check_user_fields(role, language)

        def write(db: Database) -> UserRecord:
            rows = select(db, "SELECT * FROM users WHERE name = ?", (name,))
            if not rows:
                raise NotFound(f"no user named {name!r}")
            old = user_from_row(rows[0])
            new_role = role or old.role
            new_disabled = old.disabled if disabled is None else disabled
            if old.role == "admin" and not old.disabled and (new_role != "admin" or new_disabled):
                _check_other_admin(db, old.name, "disabled" if new_disabled else f"made {new_role}")
            db.execute(
                "UPDATE users SET role = ?, password_hash = ?, language = ?, disabled = ? WHERE name = ?",
                (new_role, password_hash or old.password_hash, language or old.language, int(new_disabled), old.name),
            )
            if end_sessions or new_disabled:
                db.execute(
                    "DELETE FROM sessions WHERE user = ? AND id_hash != ?", (old.name, keep_session or "")
                )
            return user_from_row(select(db, "SELECT * FROM users WHERE name = ?", (old.name,))[0])

        return self._write(write)

    def remove(self, name: str) -> UserRecord:
        """Remove a user with their sessions and API tokens; their handling and audit lines stay.

        Raises :class:`NotFound`, and :class:`LastAdmin` for the last enabled admin.
        """

        def write(db: Database) -> UserRecord:
            rows = select(db, "SELECT * FROM users WHERE name = ?", (name,))
            if not rows:
                raise NotFound(f"no user named {name!r}")
            old = user_from_row(rows[0])
            if old.role == "admin" and not old.disabled:
                _check_other_admin(db, old.name, "removed")
            db.execute("DELETE FROM users WHERE name = ?", (old.name,))
            return old

        return self._write(write)


class Sessions(Table):
    def add(self, session: SessionRecord) -> None:
        """Store a new session, and forget every session that has expired by its creation time."""

        def write(db: Database) -> None:
            db.execute("DELETE FROM sessions WHERE expires <= ?", (session.created,))
            db.execute(
                "INSERT INTO sessions (id_hash, user, csrf_token, created, expires, address) VALUES (?, ?, ?, ?, ?, ?)",
                (session.id_hash, session.user, session.csrf_token, session.created, session.expires, session.address),
            )

        self._write(write)

    def get(self, id_hash: str) -> tuple[SessionRecord, UserRecord] | None:
        """The session with that hash and its user, expired or not (the caller compares ``expires``)."""
        rows = self._read(lambda db: select(db, "SELECT * FROM sessions WHERE id_hash = ?", (id_hash,)))
        if not rows:
            return None
        session = session_from_row(rows[0])
        user = self._read(lambda db: _user(db, session.user))
        return None if user is None else (session, user)

    def remove(self, id_hash: str) -> SessionRecord | None:
        """End a session; returns it, or None if there was none."""

        def write(db: Database) -> SessionRecord | None:
            rows = select(db, "SELECT * FROM sessions WHERE id_hash = ?", (id_hash,))
            db.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,))
            return session_from_row(rows[0]) if rows else None

        return self._write(write)


class Tokens(Table):
    def add(self, token: TokenRecord) -> None:
        """Store an API token (its hash). Raises :class:`NotFound` if its user does not exist."""

        def write(db: Database) -> None:
            if not select(db, "SELECT 1 FROM users WHERE name = ?", (token.user,)):
                raise NotFound(f"no user named {token.user!r}")
            db.execute(
                "INSERT INTO api_tokens (id, name, user, token_hash, created, last_used) VALUES (?, ?, ?, ?, ?, NULL)",
                (token.id, token.name, token.user, token.token_hash, token.created),
            )

        self._write(write)

    def find(self, token_hash: str) -> tuple[TokenRecord, UserRecord] | None:
        """The token with that hash and its user."""
        rows = self._read(lambda db: select(db, "SELECT * FROM api_tokens WHERE token_hash = ?", (token_hash,)))
        if not rows:
            return None
        token = token_from_row(rows[0])
        user = self._read(lambda db: _user(db, token.user))
        return None if user is None else (token, user)

    def all(self) -> list[TokenRecord]:
        rows = self._read(lambda db: select(db, "SELECT * FROM api_tokens ORDER BY user, created, id"))
        return [token_from_row(r) for r in rows]

    def remove(self, token_id: str) -> TokenRecord:
        """Revoke a token. Raises :class:`NotFound` if there is none with that id."""

        def write(db: Database) -> TokenRecord:
            rows = select(db, "SELECT * FROM api_tokens WHERE id = ?", (token_id,))
            if not rows:
                raise NotFound(f"no API token with id {token_id!r} (see GET /api/v1/tokens)")
            db.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,))
            return token_from_row(rows[0])

        return self._write(write)

    def touch(self, token_id: str, ts: float) -> None:
        """Record when a token was last used."""
        self._write(lambda db: db.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (ts, token_id)))


def _user(db: Database, name: str) -> UserRecord | None:
    rows = select(db, "SELECT * FROM users WHERE name = ?", (name,))
    return user_from_row(rows[0]) if rows else None


def _check_user_fields(role: str | None, language: str | None) -> None:
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if language is not None and language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, not {language!r}")


def _check_other_admin(db: Database, name: str, change: str) -> None:
    """Raise LastAdmin unless an enabled admin other than ``name`` exists."""
    others = select(db, "SELECT 1 FROM users WHERE role = 'admin' AND disabled = 0 AND name != ? LIMIT 1", (name,))
    if not others:
        raise LastAdmin(name, change)
