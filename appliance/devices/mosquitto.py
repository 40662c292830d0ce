"""The managed broker's files, made from the settings and the device registry: ``mosquitto.conf``, the ACL,
the password file and the CRL, in ``STATE/broker/`` (0700). The same files serve the supervised child
(:mod:`appliance.devices.broker`) and, in the OS image, Mosquitto under systemd.

Listeners (``per_listener_settings``, so each has its own way in):
- the daemon's, on loopback: TLS with a client certificate from the device CA (the daemon's own);
- devices with certificates, on the site-facing address: TLS, ``require_certificate``,
  ``use_identity_as_username`` (the certificate's CN is the device id), the device CA only, the CRL;
- devices with passwords, on the site-facing address: TLS (server certificate only) and the password file;
- for development only, when ``broker.allow_anonymous_loopback`` says so: anonymous, on loopback.
The ACL confines every device to its own topic and lets only the daemon read them or touch ``appliance/#``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import secrets
from dataclasses import dataclass
from pathlib import Path

from appliance.devices.ca import DAEMON_ID, DeviceCA
from appliance.settings import Settings
from appliance.store.devices import check_device
from appliance.store.records import DeviceRecord
from common.files import write_atomically
from pki.certs import pem, revocation_list

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes ($7$: PBKDF2-HMAC-SHA512, 12-byte salt)
CRL_DAYS = 3650  # the CRL is made again at every change; a long next-update keeps an idle box's valid


def password_hash(password: str) -> str:
    """A password as Mosquitto's password file holds it (``$7$iterations$salt$hash``, base64)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def device_topic(settings: Settings, device: DeviceRecord) -> str:
    t = settings.topics
    return f"{t.cameras}/{device.id}/frame" if device.kind == "camera" else f"{t.sensors}/{device.id}/telemetry"


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    folder: Path

    @property
    def config(self) -> Path:
        return self.folder / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.folder / "acl"

    @property
    def passwords(self) -> Path:
        return self.folder / "passwords"

    @property
    def crl(self) -> Path:
        return self.folder / "crl.pem"

    @property
    def daemon_acl(self) -> Path:
        return self.folder / "acl-daemon"

    @property
    def pid(self) -> Path:
        return self.folder / "mosquitto.pid"

    # the device CA's certificate and the broker's own identity, copied here: Mosquitto run by systemd sees this
    # folder and nothing else of the state (not the device CA's key, nor the daemon's)
    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"


@dataclass(frozen=True, slots=True)
class Written:
    """What writing the files changed."""

    config: bool  # a running Mosquitto must start again: it opens its listeners at start only
    crl: bool  # a certificate was revoked since the files were last written


def write_broker_files(files: BrokerFiles, settings: Settings, ca: DeviceCA, devices: list[DeviceRecord],
                       revoked: list[tuple[str, str, float]]) -> Written:
    """Every file Mosquitto reads, each replaced atomically, the configuration last."""
    b = settings.broker
    files.folder.mkdir(parents=True, exist_ok=True)
    files.folder.chmod(0o700)
    server = ca.server(b.device_names, b.certificate_days)
    _put(files.ca, ca.ca_pem, 0o644)
    _put(files.server_cert, pem(server.certificate), 0o644)
    _put(files.server_key, server.key_pem(), 0o600)
    for d in devices:  # the registry checks them; a bad one here would make Mosquitto drop its whole ACL
        check_device(d.id, d.kind)
    active = [d for d in devices if d.active]
    serials = sorted(s for s, _device, _at in revoked)
    crl_changed = _revoked_in(files.crl) != serials
    write_atomically(files.crl, revocation_list(ca.identity, [(int(s, 16), at) for s, _device, at in revoked], CRL_DAYS))
    write_atomically(files.passwords, "".join(f"{d.id}:{d.password_hash}\n" for d in active
                                              if d.auth == "password").encode(), mode=0o600)
    write_atomically(files.acl, acl_text(settings, active).encode(), mode=0o600)
    write_atomically(files.daemon_acl, daemon_acl_text(settings).encode(), mode=0o600)
    tls = f"cafile {files.ca}\ncertfile {files.server_cert}\nkeyfile {files.server_key}\ntls_version tlsv1.2\n"
    certificate = tls + f"require_certificate true\nuse_identity_as_username true\ncrlfile {files.crl}\n" \
        "allow_anonymous false\n"
    # every device goes by its user name (its id), so that each log line names the device
    # (appliance.devices.activity); a second connection with the same credential takes the session over. Not
    # the daemon: its chosen client id is one no device listener gives, so no device can take its session.
    by_name = "use_username_as_clientid true\n"
    sections = [
        "# written by the appliance from its settings and device registry; edits are overwritten\n"
        # run as the daemon's user: Mosquitto started as root would switch to "mosquitto", who cannot read them
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
        f"per_listener_settings true\npersistence false\n{_log_and_pid(settings)}log_timestamp false\n"
        # debug: a refused publish is logged at no other level (the reader counts the per-message lines and
        # keeps them out of the appliance's log)
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nlog_type debug\n"
        "connection_messages true\n"
        "max_packet_size " + str(settings.ingest.max_frame_bytes + 4096) + "\n",
        f"# the daemon\nlistener {b.port} 127.0.0.1\n{certificate}acl_file {files.daemon_acl}\n",
        (f"# devices with a certificate from the device CA\nlistener {b.device_port} {b.device_host}\n{certificate}"
        f"{by_name}acl_file {files.acl}\n"),
        (f"# devices with a password\nlistener {b.password_port} {b.device_host}\n{tls}password_file {files.passwords}\n"
         f"{by_name}allow_anonymous false\n"
        f"acl_file {files.acl}\n"),
    ]
    if b.allow_anonymous_loopback:
        sections.append(f"# development only: anonymous clients on loopback\nlistener {b.anonymous_port} 127.0.0.1\n"
                        f"allow_anonymous true\nacl_file {files.acl}\n")
    config = "\n".join(sections).encode()
    try:
        unchanged = files.config.read_bytes() == config
    except OSError:
        unchanged = False
    if not unchanged:
        write_atomically(files.config, config, mode=0o600)
    return Written(config=not unchanged, crl=crl_changed)


def _revoked_in(crl: Path) -> list[str] | None:
    """The serials (hex, as the registry keeps them) an existing CRL file lists; None if there is none."""
    from cryptography import x509

    try:
        listed = x509.load_pem_x509_crl(crl.read_bytes())
    except (OSError, ValueError):
        return None
    return sorted(f"{r.serial_number:x}" for r in listed)


def _put(path: Path, data: bytes, mode: int) -> None:
    """``data`` into ``path`` atomically, unless it holds it already."""
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    write_atomically(path, data, mode=mode)


def _log_and_pid(settings: Settings) -> str:
    """The daemon's child logs to its pipe (the daemon writes its pid file); Mosquitto under systemd logs to a
    file in its runtime folder, which the daemon follows, and writes its pid beside it."""
    b = settings.broker
    if b.supervisor == "daemon":
        return "log_dest stderr\n"
    return f"log_dest file {b.run_dir / 'mosquitto.log'}\npid_file {b.run_dir / 'mosquitto.pid'}\n"


def daemon_acl_text(settings: Settings) -> str:
    """The daemon's listener only (loopback): its certificate gives nothing on the devices' listeners."""
    t = settings.topics
    return "\n".join([f"user {DAEMON_ID}", f"topic read {t.cameras}/+/frame", f"topic read {t.sensors}/+/telemetry",
                      f"topic readwrite {t.appliance}/#", "topic read $SYS/#"]) + "\n"


def acl_text(settings: Settings, active: list[DeviceRecord]) -> str:
    t = settings.topics
    lines = ["# anonymous clients (the development listener only, when allowed)"]
    if settings.broker.allow_anonymous_loopback:
        lines += [f"topic write {t.cameras}/+/frame", f"topic write {t.sensors}/+/telemetry"]
    for d in active:
        lines += ["", f"user {d.id}", f"topic write {device_topic(settings, d)}"]
    return "\n".join(lines) + "\n"
