"""The appliance daemon's errors, grouped by origin. Library errors are translated at the boundary."""

from __future__ import annotations

from typing import Literal

# why a message from a camera or sensor is refused: the word it is counted under
RejectReason = Literal["too_large", "bad_json", "bad_value",  # telemetry, in ingest
                       "not_an_image", "corrupt_image", "image_too_large", "bad_telemetry"]  # in the worker


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose; the message tells the user what to do."""


class ConfigError(ApplianceError):
    """The settings are invalid; the message names the key and the file or environment variable."""


class InstallError(ApplianceError):
    """A model or app package was refused at install; nothing installed was changed."""


class DaemonUnreachable(ApplianceError):
    """The CLI could not reach a running daemon."""


class FrameRejected(ApplianceError):
    """A frame or telemetry message cannot be used: counted per source under ``reason`` (stats, console and
    ``appliance_frames_rejected``); ``detail`` says what was wrong and what to do. Raised by ingest's
    checks and by the partition workers' decoding, so it must survive pickling."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason: RejectReason = reason
        self.detail = detail

    def __str__(self) -> str:
        return self.detail

    def __reduce__(self) -> tuple[type[FrameRejected], tuple[RejectReason, str]]:
        # the default reduce would call FrameRejected(detail) and fail across a process boundary
        return (FrameRejected, (self.reason, self.detail))
