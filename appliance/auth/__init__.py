"""Accounts and security for the console and the API: users and roles, scrypt password hashes, browser
sessions with CSRF tokens, API tokens, and login rate limits. There is no default password.

Usage::

    from appliance.auth import Accounts, Actor

    accounts = Accounts(store)
    accounts.add_user("ward-admin", "admin", "a long pass phrase", by=Actor("cli", "local"))
    session = accounts.login("ward-admin", "a long pass phrase", address="10.0.0.7")
    principal = accounts.session(session.cookie)        # what each request resolves its cookie to
    assert principal is not None and principal.allows("operator")

The HTTP side (cookies, the CSRF check, role dependencies) is :mod:`appliance.http.security`.
"""

from appliance.auth.accounts import (
    TOKEN_PREFIX,
    USER_NAME,
    Accounts,
    Actor,
    NewSession,
    Principal,
    SessionLimits,
    check_user_name,
)
from appliance.auth.errors import (
    AuthError,
    CsrfRefused,
    InvalidAccount,
    LoginFailed,
    NotASession,
    NotAuthenticated,
    NoUsersYet,
    PermissionDenied,
    TooManyAttempts,
)
from appliance.auth.passwords import (
    PasswordPolicy,
    ScryptParams,
    check_password,
    hash_password,
    needs_rehash,
    verify_password,
)
from appliance.auth.ratelimit import LoginLimiter, LoginLimits

__all__ = [
    "TOKEN_PREFIX",
    "USER_NAME",
    "Accounts",
    "Actor",
    "AuthError",
    "CsrfRefused",
    "InvalidAccount",
    "LoginFailed",
    "LoginLimiter",
    "LoginLimits",
    "NewSession",
    "NoUsersYet",
    "NotASession",
    "NotAuthenticated",
    "PasswordPolicy",
    "PermissionDenied",
    "Principal",
    "ScryptParams",
    "SessionLimits",
    "TooManyAttempts",
    "check_password",
    "check_user_name",
    "hash_password",
    "needs_rehash",
    "verify_password",
]
