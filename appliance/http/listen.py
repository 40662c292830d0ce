"""Where the console listens: the socket, the TLS pair and the uvicorn server, for the daemon and for the
first-boot page (:mod:`appliance.console.firstboot`), which serve on the same address one after the other."""

from __future__ import annotations

import socket
import ssl

import uvicorn
from starlette.types import ASGIApp

from appliance.errors import ApplianceError, ConfigError
from appliance.settings import HttpSettings


def check_tls(h: HttpSettings) -> None:
    """Load the certificate and key once before anything starts, so a bad pair stops the program with a
    message that names the files rather than failing inside the server task."""
    if h.tls_cert is None or h.tls_key is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(h.tls_cert, h.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot use http.tls_cert {h.tls_cert} with http.tls_key {h.tls_key}: {e}; give a PEM "
                          "certificate (chain) and its private key, readable by the daemon") from e


def bind_http(h: HttpSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in h.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((h.host, h.port))
    except OSError as e:
        sock.close()
        raise ApplianceError(f"cannot serve HTTP on {h.host}:{h.port}: {e.strerror}; is another daemon running? "
                             "Stop it or set http.port") from e
    sock.listen(128)
    sock.setblocking(False)
    return sock


def http_server(app: ASGIApp, h: HttpSettings) -> uvicorn.Server:
    # proxy_headers off: the client address (rate limits, audit) is the socket's, never a header's
    return uvicorn.Server(uvicorn.Config(
        app, log_level="warning", lifespan="off", access_log=False, proxy_headers=False, server_header=False,
        timeout_graceful_shutdown=5,
        ssl_certfile=str(h.tls_cert) if h.tls_cert else None, ssl_keyfile=str(h.tls_key) if h.tls_key else None))
