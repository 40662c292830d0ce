"""The appliance daemon's errors, grouped by origin. Library errors are translated at the boundary."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose; the message tells the user what to do."""


class ConfigError(ApplianceError):
    """The settings are invalid; the message names the key and the file or environment variable."""


class InstallError(ApplianceError):
    """A model or app package was refused at install; nothing installed was changed."""


class DaemonUnreachable(ApplianceError):
    """The CLI could not reach a running daemon."""
