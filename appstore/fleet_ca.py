"""The fleet CA: the AppStore's own CA for the boxes' operational client certificates.

::

    DIR/fleet-ca/ca.pem   the CA certificate: what a TLS front (``appstore serve --client-certificates``,
                          or a reverse proxy) checks the boxes' client certificates against
    DIR/fleet-ca/ca.key   its key (0600), never served

Made at first use. A box sends a CSR for a key it made itself with its enrolment (bound into its factory
proof), and gets back a certificate naming its device id; the AppStore never sees the box's private key.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from cryptography import x509

from pki.certs import Identity, certify, issue, load_signing_request, name, pem, private_folder

FLEET_CA_YEARS = 20
CLIENT_DAYS = 825  # what browsers and most TLS stacks accept for a leaf; a box re-enrols before then


class FleetCA:
    def __init__(self, appstore_folder: Path) -> None:
        self.folder = appstore_folder / "fleet-ca"

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def identity(self) -> Identity:
        if self.ca_file.exists():
            return Identity.load(self.folder, "ca", "the fleet CA")
        private_folder(self.folder)
        with open(self.folder / ".lock", "w") as lock:  # the server and the CLI may both make it first
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.ca_file.exists():
                return Identity.load(self.folder, "ca", "the fleet CA")
            ca = issue(name("Edge appliance fleet CA", "fleet"), None, 365 * FLEET_CA_YEARS, ca=True)
            ca.save(self.folder, "ca")  # the key, then the certificate, whose presence says both are there
            return ca

    def certificate_file(self) -> Path:
        """The CA certificate's path, the CA made first if there is none yet (a TLS front reads it)."""
        _ = self.identity
        return self.ca_file

    def certify(self, csr: str, device_id: str) -> x509.Certificate:
        """A client certificate naming ``device_id`` for the key ``csr`` proves it holds (CertificateError
        when the CSR is not one)."""
        key = load_signing_request(csr, "the enrolment's certificate signing request")
        return certify(key, name(device_id, "fleet"), self.identity, CLIENT_DAYS, client=True)

    def pem(self) -> bytes:
        return pem(self.identity.certificate)
