"""Why an upgrade did not happen: each error names the release, what was wrong and what to do."""

from __future__ import annotations

from appliance.errors import ApplianceError


class UpgradeError(ApplianceError):
    """An upgrade step failed; the running release is untouched and keeps serving."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry  # True: worth trying again at the next pass (the AppStore was out of reach)


class InstallFailed(UpgradeError):
    """The release could not be made into an environment on this box (uv failed, a wheel is missing)."""


class SelfTestFailed(UpgradeError):
    """The new release installed but failed its self-test (imports, settings, migrations, model load)."""
