"""What every concern of the store shares: the store's one writer and its read connections, and a few helpers.

Each concern (``store.models``, ``store.events``, ...) is a :class:`Table` built by the :class:`Store` that
owns the connections, as sqlite-utils' ``Table`` belongs to its ``Database``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlite_utils import Database

if TYPE_CHECKING:
    from appliance.store.db import Store


class Table:
    """A group of the store's methods; writes go through the store's writer thread, reads through the
    calling thread's read connection, timestamps come from the store's clock."""

    def __init__(self, store: Store) -> None:
        self._write = store._write
        self._read = store._read
        self._clock = store._clock


def select(db: Database, sql: str, params: Iterable[object] = ()) -> list[dict[str, Any]]:
    """The rows of a query, each a dict by column name."""
    return list(db.query(sql, list(params)))


def check_json(text: str, what: str) -> None:
    try:
        json.loads(text)
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from e
