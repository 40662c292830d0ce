"""The AppStore's errors, grouped by origin. Each message says what was wrong and what to do.

A foreign error (tuf, securesystemslib, sqlite3, a format) is translated once, where it is met; the CLI
prints the message and exits 2, the server maps the class to an HTTP status in one handler.
"""

from __future__ import annotations


class AppStoreError(Exception):
    """Base of every error the AppStore raises on purpose."""


class RepoError(AppStoreError):
    """The repository folder is missing, already exists, or lacks a key it needs."""


class PublishError(AppStoreError):
    """A model or app was refused; nothing in the repository was changed."""


class ChannelError(AppStoreError):
    """A channel change was refused: unknown channel, unpublished version, a rollout in the way."""


class FleetError(AppStoreError):
    """A fleet registry request was refused (unknown or duplicate device)."""


class BadRequest(AppStoreError):
    """An HTTP request body or parameter is invalid (400)."""


class Unauthorized(AppStoreError):
    """No valid token came with the request (401)."""


class Forbidden(AppStoreError):
    """The token is valid but not for this resource (403)."""


class TooLarge(AppStoreError):
    """A request body is larger than the AppStore accepts (413)."""
