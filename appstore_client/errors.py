"""Everything the appliance's link to the AppStore raises, grouped by what the caller should do about it.

- :class:`AppStoreError`: the base; catch it to catch anything from this package.
  - :class:`CatalogError`: TUF refused what the AppStore served, or could not fetch it (catalog, channel,
    download); ``reason`` is one word for counting and for the console (``offline``, ``expired``, ...).
  - :class:`FleetError`: a fleet call (status report, sample upload) failed.
    - :class:`Unreachable`: no answer at all (connection, TLS handshake, timeout); try again later.
    - :class:`Refused`: the AppStore answered with an error; ``permanent`` says whether sending the same
      request again can ever succeed (a malformed record: no; authentication, rate and size limits: yes).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["RETRYABLE_STATUS", "AppStoreError", "CatalogError", "CatalogReason", "FleetError", "Refused",
           "Unreachable"]

RETRYABLE_STATUS = frozenset({401, 403, 408, 413, 429})  # 4xx that the same request may pass later

CatalogReason = Literal["offline", "expired", "rollback", "untrusted", "tampered", "not_published", "invalid"]


class AppStoreError(Exception):
    """The AppStore could not be used; the message says why and, where it can, what to do."""


class CatalogError(AppStoreError):
    """The verified catalog, a channel or a download is not available; ``reason`` says which way."""

    def __init__(self, reason: CatalogReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FleetError(AppStoreError):
    """The AppStore could not be reached, or refused the request (the message says which, and why)."""


class Unreachable(FleetError):
    """No answer from the AppStore (connection refused, TLS handshake, timeout): the request may pass later."""


class Refused(FleetError):
    """The AppStore answered ``status``; ``reason`` is its own words (its ``error`` field, or the body)."""

    def __init__(self, message: str, status: int, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    @property
    def permanent(self) -> bool:
        """True when the request itself is wrong (4xx other than auth, timeout, size and rate limits):
        sending it again cannot help, so the caller sets it aside instead of retrying forever."""
        return 400 <= self.status < 500 and self.status not in RETRYABLE_STATUS
