"""What provisioning raises: every message names what was wrong and what to do."""

from __future__ import annotations


class ProvisioningError(Exception):
    """A provisioning step failed (a file that cannot be read, a command used wrong)."""


class Refused(ProvisioningError):
    """A bundle (or one of its parts) does not verify; ``step`` names the check that refused it, in the order
    the box checks (docs/provisioning.md), and nothing of it is applied."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason
