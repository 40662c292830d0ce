"""The appliance's local device CA, in ``STATE/devices/`` (0700): it issues each camera's and sensor's client
certificate, the managed broker's server certificate and the daemon's own client certificate, and signs
the CRL. It is made on first use and never leaves the box; no system CA store is ever trusted for devices.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pki.certs import Identity, issue, name, pem, private_folder

CA_DAYS = 365 * 20
DAEMON_ID = "_appliance"  # the daemon's own identity on the broker: no device id can start with "_"
CA_STEM, SERVER_STEM, DAEMON_STEM = "ca", "broker", "daemon"


class DeviceCA:
    def __init__(self, folder: Path, device_id: str) -> None:
        self.folder = folder
        self.device_id = device_id  # the appliance's own device id, in the CA's name
        private_folder(folder)
        if (folder / f"{CA_STEM}.key").is_file():
            self.identity = Identity.load(folder, CA_STEM, "the device CA")
        else:
            self.identity = issue(name(f"{device_id} device CA", "edge appliance"), None, CA_DAYS, ca=True)
            self.identity.save(folder, CA_STEM)

    @property
    def ca_pem(self) -> bytes:
        return pem(self.identity.certificate)

    @property
    def ca_file(self) -> Path:
        return self.folder / f"{CA_STEM}.pem"

    def issue_device(self, device_id: str, days: int) -> Identity:
        return issue(name(device_id, self.device_id), self.identity, days, client=True)

    def server(self, hosts: list[str], days: int) -> Identity:
        """The broker's server certificate for ``hosts``, made again when the hosts change or it nears its end."""
        wanted = sorted({"127.0.0.1", "localhost", *hosts})
        path = self.folder / f"{SERVER_STEM}.pem"
        if path.is_file():
            current = Identity.load(self.folder, SERVER_STEM, "the broker certificate")
            if _names(current) == wanted and _days_left(current) > days / 4:
                return current
        identity = issue(name(wanted[0], self.device_id), self.identity, days, server_names=wanted)
        identity.save(self.folder, SERVER_STEM)
        return identity

    def daemon(self, days: int) -> Identity:
        path = self.folder / f"{DAEMON_STEM}.pem"
        if path.is_file():
            current = Identity.load(self.folder, DAEMON_STEM, "the daemon's broker certificate")
            if _days_left(current) > days / 4:
                return current
        identity = issue(name(DAEMON_ID, self.device_id), self.identity, days, client=True)
        identity.save(self.folder, DAEMON_STEM)
        return identity


def _names(identity: Identity) -> list[str]:
    from cryptography import x509

    try:
        sans = identity.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sorted([str(n.value) for n in sans])


def _days_left(identity: Identity) -> float:
    return (identity.certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400
