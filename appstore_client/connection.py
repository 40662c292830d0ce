"""The one HTTP connection to an AppStore: its URL, TLS (the CA to trust, a client certificate), timeouts.

Everything the appliance sends to or fetches from the AppStore goes through one :class:`Connection`: the
TUF fetcher (catalog and downloads), the fleet client (status reports, hard samples) and next enrolment
and self-upgrade. So a private CA or a client certificate configured once holds for all of them::

    conn = Connection(ConnectionOptions("https://store.example/", ca_file=Path("ca.pem"),
                                        cert_file=Path("device.pem"), key_file=Path("device.key")))
    fetcher = ResumableFetcher(cache / "partial", conn)
    fleet = FleetClient(conn, "ward-7", token)

Retries are the caller's (the fetcher resumes, the sync and uploader back off), so the pool never retries
on its own. A failed TLS handshake is translated once, here, into a message that names the settings.
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3

_HUNG_UP = (http.client.RemoteDisconnected, ConnectionResetError, urllib3.exceptions.ProtocolError)
TIMEOUT_S = 30.0  # seconds to connect, and between two reads of an answer


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Where the AppStore is and how to reach it (``[appstore]`` in the appliance's settings)."""

    url: str
    ca_file: Path | None = None  # HTTPS: the CA to trust (default: the system's)
    cert_file: Path | None = None  # HTTPS client certificate, when the AppStore asks for one
    key_file: Path | None = None
    timeout_s: float = TIMEOUT_S
    user_agent: str = "edge-appliance"


class Connection:
    """A pool of HTTP(S) connections to one AppStore, safe to share between threads."""

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        o = options
        self.pool = urllib3.PoolManager(
            headers={"User-Agent": o.user_agent}, retries=False,
            timeout=urllib3.Timeout(connect=o.timeout_s, read=o.timeout_s),
            ca_certs=str(o.ca_file) if o.ca_file else None,
            cert_file=str(o.cert_file) if o.cert_file else None,
            key_file=str(o.key_file) if o.key_file else None)

    @property
    def base_url(self) -> str:
        return self.options.url.rstrip("/")

    def request(self, method: str, url: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        """``pool.request``; a URL without a scheme is relative to the AppStore's."""
        if "://" not in url:
            url = f"{self.base_url}/{url.lstrip('/')}"
        return self.pool.request(method, url, **kwargs)

    def describe(self, error: BaseException) -> str:
        """Why a request failed, in words that say what to check."""
        o = self.options
        root = _root(error)
        cause = f"{type(root).__name__}: {root}"
        tls = _is_tls(error)
        # TLS 1.3: a server that requires a client certificate and gets none ends the connection after the
        # handshake, so the client sees a closed connection rather than a TLS alert
        hung_up = o.url.startswith("https://") and any(isinstance(e, _HUNG_UP) for e in _chain(error))
        if not (tls or hung_up):
            return f"the AppStore at {o.url} cannot be reached ({cause})"
        client = (f"the client certificate {o.cert_file}" if o.cert_file else
                  "no client certificate (set appstore.cert_file and appstore.key_file if it requires one)")
        trusted = f"the CA in {o.ca_file}" if o.ca_file else "the system's CAs (set appstore.ca_file for a private CA)"
        what = "the TLS handshake with" if tls else "the TLS connection was closed without an answer by"
        return f"{what} the AppStore at {o.url} failed ({cause}); this appliance trusts {trusted} and presents {client}"

    def close(self) -> None:
        self.pool.clear()


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the causes urllib3 wrapped in it (MaxRetryError -> SSLError -> ssl.SSLError), outer first."""
    chain = [error]
    while len(chain) < 8:
        inner = getattr(chain[-1], "reason", None)
        if not isinstance(inner, BaseException):
            inner = chain[-1].__cause__ or chain[-1].__context__
        if inner is None or inner in chain:
            break
        chain.append(inner)
    return chain


def _root(error: BaseException) -> BaseException:
    return _chain(error)[-1]


def _is_tls(error: BaseException) -> bool:
    return any(isinstance(e, (ssl.SSLError, urllib3.exceptions.SSLError)) for e in _chain(error))
