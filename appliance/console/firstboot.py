"""The read-only page a box serves while it provisions itself (``appliance provision``).

Before provisioning there is no admin and no daemon, so the console cannot be served yet; this page stands
in on the console's own address (the factory's ``[http]`` settings) and shows, to anyone who opens it, the
box's serial and each step of the first-boot agent with its reason (``STATE/provisioning/state.json``). It
has no forms but the language switch, reveals nothing that is not in that record (no keys, no tokens, no
settings), and goes away when provisioning ends, so that ``appliance run`` takes the address; every other
path is sent to it, and a browser left open on it reloads into the console's login.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Annotated, Self

from fastapi import FastAPI, Form, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from appliance.console.web import HERE, language_choice, remember_language, render
from appliance.http.listen import bind_http, check_tls, http_server
from appliance.http.server import SecurityHeaders
from appliance.settings import HttpSettings
from formats.provisioning import ProvisionState
from provisioning.agent import load_state
from provisioning.errors import ProvisioningError

log = logging.getLogger("appliance.provision")

REFRESH_S = 5
START_WAIT_S = 10.0


def first_boot_app(state_path: Path, serial: str, secure: bool) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/")
    def page(request: Request) -> Response:
        try:
            state = load_state(state_path)
        except ProvisioningError:
            state = ProvisionState()
        state.serial = state.serial or serial
        return render(request, "first_boot.html", None, provisioning=state, refresh=REFRESH_S)

    @app.post("/language")
    def language(lang: Annotated[str, Form(max_length=8)]) -> Response:
        response = RedirectResponse("/", status_code=303)
        chosen = language_choice(lang)
        if chosen is not None:
            remember_language(response, chosen, secure)
        return response

    @app.get("/{path:path}")
    def elsewhere(path: str) -> Response:
        return RedirectResponse("/", status_code=303)

    return app


class FirstBootPage:
    """Serves :func:`first_boot_app` on the console's address from a thread, for as long as it is entered."""

    def __init__(self, http: HttpSettings, state_path: Path, serial: str) -> None:
        check_tls(http)
        self._sock = bind_http(http)
        self._server = http_server(SecurityHeaders(first_boot_app(state_path, serial, http.tls)), http)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="first-boot-page", daemon=True)
        host, port = self._sock.getsockname()[:2]
        self.url = f"{'https' if http.tls else 'http'}://{host}:{port}/"

    def __enter__(self) -> Self:
        self._thread.start()
        log.info("first-boot progress is on %s until provisioning is done", self.url)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(START_WAIT_S)
        self._sock.close()
