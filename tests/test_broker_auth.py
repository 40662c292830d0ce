"""The external broker as a site runs it: Mosquitto with passwords, and with TLS client certificates."""

from __future__ import annotations

from pathlib import Path

import pytest

from pki.certs import issue, name, pem
from tests.conftest import MOSQUITTO_BASE, DaemonFactory, Mosquitto, free_port, mosquitto_with_password, wait_until

pytestmark = pytest.mark.slow


def make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in ``d``."""
    ca = issue(name("test-ca"), None, 1, ca=True)
    (d / "ca.pem").write_bytes(pem(ca.certificate))
    issue(name("server"), ca, 1, server_names=["127.0.0.1"]).save(d, "server")
    issue(name("client"), ca, 1, client=True).save(d, "client")


def test_password_protected_broker(tmp_path: Path, make_daemon: DaemonFactory) -> None:
    broker = mosquitto_with_password(tmp_path, "appliance", "s3cret-pw")
    port = broker.port
    try:
        good = make_daemon(broker_port=port, broker_extra='username = "appliance"\npassword = "s3cret-pw"')
        assert good.status()["broker"]["connected"]
        bad = make_daemon(broker_port=port, start=False, broker_extra='username = "appliance"\npassword = "wrong-pw"')
        bad.start(healthy=False)
        _, health = wait_until(lambda: (h := bad.healthz())[0] == 503 and h, 30, what="an unhealthy daemon")
        assert "not connected to the MQTT broker" in health["reason"]
        wait_until(lambda: "refused the connection" in bad.log(), 20, what="the refusal in the log")
    finally:
        broker.stop()
    for d in (good, bad):
        assert "s3cret-pw" not in d.log() and "wrong-pw" not in d.log(), "passwords are never logged"


def test_tls_client_certificate(tmp_path: Path, make_daemon: DaemonFactory) -> None:
    make_pki(tmp_path)
    port = free_port()
    conf = tmp_path / "m.conf"
    conf.write_text(f"{MOSQUITTO_BASE}listener {port} 127.0.0.1\nallow_anonymous true\ncafile {tmp_path}/ca.pem\n"
                    f"certfile {tmp_path}/server.pem\nkeyfile {tmp_path}/server.key\nrequire_certificate true\n")
    broker = Mosquitto(port, conf)
    broker.start()
    try:
        d = make_daemon(broker_port=port, broker_extra=f"""
            tls_ca = "{tmp_path}/ca.pem"
            tls_cert = "{tmp_path}/client.pem"
            tls_key = "{tmp_path}/client.key"
            """)
        assert d.status()["broker"]["connected"]
    finally:
        broker.stop()
    wait_until(lambda: not d.status()["broker"]["connected"], 20, what="broker gone")
