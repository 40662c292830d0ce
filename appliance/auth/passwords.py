"""Password hashing with scrypt (``hashlib.scrypt``) and the password policy.

A hash is a self-describing string, ``scrypt$ln=15,r=8,p=1$<salt>$<key>`` (URL-safe base64 without
padding), so the cost can be raised later: old hashes still verify, and :func:`needs_rehash` tells the
caller to store a new one at the next successful login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass

from appliance.auth.errors import InvalidAccount

# Each scrypt run holds 128 * r * 2**ln bytes (32 MiB at the defaults): at most this many run at once,
# so a burst of logins cannot take the management plane's memory.
MAX_CONCURRENT_HASHES = 2
_hashing = threading.BoundedSemaphore(MAX_CONCURRENT_HASHES)

_SCHEME = "scrypt"


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt cost. The defaults take about 0.1 s and 32 MiB per hash on a small x86 core."""

    log2_n: int = 15  # CPU/memory cost N = 2**log2_n
    r: int = 8  # block size: each of the N blocks is 128 * r bytes
    p: int = 1  # parallelisation
    salt_bytes: int = 16  # bytes of random salt per hash
    key_bytes: int = 32  # bytes of derived key

    @property
    def memory_bytes(self) -> int:
        return int(128 * self.r * ((1 << self.log2_n) + self.p + 2))

    def encode(self) -> str:
        return f"ln={self.log2_n},r={self.r},p={self.p}"


@dataclass(frozen=True, slots=True)
class PasswordPolicy:
    min_length: int = 10  # characters
    max_length: int = 1024  # characters; longer input is refused rather than hashed


# A few of the passwords every guessing list starts with; the length rule already stops most others.
COMMON_PASSWORDS = frozenset({
    "1234567890", "12345678910", "0123456789", "1111111111", "0000000000", "1q2w3e4r5t", "qwertyuiop",
    "password12", "password123", "password1234", "passw0rd123", "administrator", "iloveyou12", "changeme123",
    "letmein1234", "welcome123", "qwerty12345", "abcdefghij", "abc1234567", "admin12345", "admin123456",
})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derive(password: str, salt: bytes, params: ScryptParams) -> bytes:
    with _hashing:
        return hashlib.scrypt(password.encode(), salt=salt, n=2**params.log2_n, r=params.r, p=params.p,
                              maxmem=2 * params.memory_bytes, dklen=params.key_bytes)


def hash_password(password: str, params: ScryptParams | None = None) -> str:
    """A new salted scrypt hash of ``password``, as a self-describing string."""
    params = params or ScryptParams()
    salt = secrets.token_bytes(params.salt_bytes)
    return f"{_SCHEME}${params.encode()}${_b64(salt)}${_b64(_derive(password, salt, params))}"


def _parse(encoded: str) -> tuple[ScryptParams, bytes, bytes] | None:
    try:
        scheme, cost, salt, key = encoded.split("$")
        values = dict(item.split("=", 1) for item in cost.split(","))
        params = ScryptParams(log2_n=int(values["ln"]), r=int(values["r"]), p=int(values["p"]))
        raw_salt, raw_key = _unb64(salt), _unb64(key)
    except (ValueError, KeyError):
        return None
    if scheme != _SCHEME or not (1 <= params.log2_n <= 22 and 1 <= params.r <= 32 and 1 <= params.p <= 16):
        return None
    params = ScryptParams(params.log2_n, params.r, params.p, len(raw_salt), len(raw_key))
    return params, raw_salt, raw_key


def is_password_hash(encoded: str) -> bool:
    """Whether ``encoded`` is a hash this module makes and verifies (e.g. one from site provisioning)."""
    return _parse(encoded) is not None


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches the hash; compared in constant time. A malformed hash never matches."""
    parsed = _parse(encoded)
    if parsed is None:
        return False
    params, salt, key = parsed
    return hmac.compare_digest(_derive(password, salt, params), key)


def needs_rehash(encoded: str, params: ScryptParams | None = None) -> bool:
    """Whether the hash was made with other parameters than ``params`` (store a new one after login)."""
    want = params or ScryptParams()
    parsed = _parse(encoded)
    return parsed is None or parsed[0].encode() != want.encode()


_dummy: dict[ScryptParams, str] = {}


def dummy_hash(params: ScryptParams | None = None) -> str:
    """A hash no password matches, to verify against for unknown users: a failed login then takes as long
    whether or not the user exists, so timing does not tell which names exist."""
    params = params or ScryptParams()
    if params not in _dummy:
        _dummy[params] = hash_password(secrets.token_urlsafe(16), params)
    return _dummy[params]


def check_password(password: str, user: str, policy: PasswordPolicy | None = None) -> None:
    """Raise :class:`InvalidAccount`, saying why, unless ``password`` is acceptable for ``user``."""
    policy = policy or PasswordPolicy()
    if len(password) < policy.min_length:
        raise InvalidAccount(f"the password is too short: use at least {policy.min_length} characters "
                             "(a few words make a password that is long and easy to remember)")
    if len(password) > policy.max_length:
        raise InvalidAccount(f"the password is too long: use at most {policy.max_length} characters")
    if not password.strip():
        raise InvalidAccount("the password must not be only spaces")
    name, text = user.lower(), password.lower()
    if name and (text == name or (len(name) >= 3 and name in text)):
        raise InvalidAccount("the password must not be or contain the user name")
    if password.lower() in COMMON_PASSWORDS or len(set(password)) < 3:
        raise InvalidAccount("the password is one of the first that attackers guess; choose another")
