"""The three parties' identities: the maker's CA, a box's factory identity, the owner.

Made with :mod:`pki.certs` (ECDSA P-256, private keys 0600, certificates PEM). A box's factory identity
is a key and a certificate whose subject names its serial (``serialNumber`` and ``CN``), issued by the
maker CA, whose certificate the box keeps as its trust anchor for vouchers.
"""

from __future__ import annotations

import base64

from cryptography import x509
from cryptography.x509.oid import NameOID

from formats.provisioning import Purpose, proof_message
from pki.certs import Identity, issue, name, pem

CA_YEARS = 25  # a maker CA outlives every box it makes
DEVICE_YEARS = 20  # a factory identity lasts the box's life
OWNER_YEARS = 10


def serial_of(cert: x509.Certificate) -> str:
    """The box serial a factory certificate names ("" when it names none)."""
    names = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    return str(names[0].value) if names else ""


def make_ca(maker: str) -> Identity:
    """A maker's CA: it signs factory certificates and ownership vouchers."""
    return issue(name(f"{maker} device CA", maker), None, 365 * CA_YEARS, ca=True)


def make_device(serial: str, maker: Identity) -> Identity:
    """A box's factory identity, naming ``serial``, issued by the maker CA."""
    return issue(name(serial, maker.name, serial=serial), maker, 365 * DEVICE_YEARS, client=True)


def make_owner(owner: str) -> Identity:
    """An owner's signing identity (self-signed: a voucher pins it by its fingerprint)."""
    return issue(name(owner, owner), None, 365 * OWNER_YEARS)


def prove(identity: Identity, purpose: Purpose, now: float, csr: str | None = None) -> tuple[str, str]:
    """A proof of the factory identity for ``purpose`` (and the CSR it binds): (certificate PEM, base64
    signature)."""
    signature = identity.sign(proof_message(purpose, serial_of(identity.certificate), now, csr))
    return pem(identity.certificate).decode(), base64.b64encode(signature).decode()
