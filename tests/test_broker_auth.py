"""The external broker as a site runs it: Mosquitto with passwords, and with TLS client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import MOSQUITTO_BASE, DaemonFactory, Mosquitto, free_port, mosquitto_with_password, wait_until

pytestmark = pytest.mark.slow


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in ``d``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, None, ca_key, ca=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write_key(key, d / f"{name}.key")
        (d / f"{name}.pem").write_bytes(_cert(name, key, ca, ca_key, ca=False).public_bytes(serialization.Encoding.PEM))


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
