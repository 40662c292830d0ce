"""Errors of accounts and security; the HTTP layer maps each class to one status code."""

from __future__ import annotations

import math

from appliance.errors import ApplianceError


class AuthError(ApplianceError):
    """Base of the errors of :mod:`appliance.auth`; the message says what to do."""


class NotAuthenticated(AuthError):
    """No valid credential came with the request, or a login failed (HTTP 401)."""


class LoginFailed(NotAuthenticated):
    """Wrong user name or password, or a disabled account."""


class NoUsersYet(NotAuthenticated):
    """Nobody can log in because no user exists; the first admin is created on the box."""

    def __init__(self) -> None:
        super().__init__(
            "no user exists yet, so nobody can log in: create the first admin on the appliance itself with "
            "`appliance users add NAME --role admin` (there is no default password)"
        )


class PermissionDenied(AuthError):
    """The user is known but their role does not allow this (HTTP 403)."""


class CsrfRefused(PermissionDenied):
    """A state-changing request came with a session cookie but without the session's CSRF token."""


class NotASession(AuthError):
    """The request needs a browser session, and came with an API token (HTTP 400)."""


class InvalidAccount(AuthError):
    """A user name or password that the policy refuses (HTTP 422); ``field`` names which."""

    def __init__(self, message: str, field: str = "password") -> None:
        self.field = field
        super().__init__(message)


class TooManyAttempts(AuthError):
    """Too many failed logins lately for this user or from this address (HTTP 429)."""

    def __init__(self, retry_after_s: float, why: str, cause: str = "login") -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        self.cause = cause  # which limit: "user+address", "address", or "user" (a name guessed from many addresses)
        super().__init__(f"too many failed logins {why}; try again in {self.retry_after_s} s, "
                         "or ask an admin to reset the password")
