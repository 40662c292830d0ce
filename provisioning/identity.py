"""Keys and certificates of the three parties: the maker's CA, a box's factory identity, the owner.

All keys are ECDSA P-256 (what a TPM or secure element holds, and what SZTP and FDO use). Private keys
are written 0600 and never leave the folder they were made in; certificates are PEM. A box's factory
identity is a key and a certificate whose subject names its serial (``serialNumber`` and ``CN``), issued
by the maker CA, whose certificate the box keeps as its trust anchor for vouchers.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.files import write_atomically
from formats.provisioning import Purpose, proof_message
from provisioning.errors import ProvisioningError

CA_YEARS = 25  # a maker CA outlives every box it makes
DEVICE_YEARS = 20  # a factory identity lasts the box's life
OWNER_YEARS = 10


@dataclass(frozen=True, slots=True)
class Identity:
    """A private key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def name(self) -> str:
        return common_name(self.certificate)

    def save(self, folder: Path, stem: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / f"{stem}.key", self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)
        write_atomically(folder / f"{stem}.pem", pem(self.certificate))

    @classmethod
    def load(cls, folder: Path, stem: str, what: str) -> Identity:
        key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.pem"
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except FileNotFoundError as e:
            raise ProvisioningError(f"{what}: {e.filename} does not exist") from e
        except (OSError, ValueError) as e:
            raise ProvisioningError(f"{what}: cannot read {key_path} or {cert_path}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ProvisioningError(f"{what}: {key_path} is not an ECDSA key")
        return cls(key, cert)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 of the certificate's DER bytes, as vouchers pin it."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def serial_of(cert: x509.Certificate) -> str:
    """The box serial a factory certificate names ("" when it names none)."""
    names = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    return str(names[0].value) if names else ""


def load_certificate(data: bytes | str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data.encode() if isinstance(data, str) else data)
    except ValueError as e:
        raise ProvisioningError(f"{what} is not a PEM certificate ({e})") from e


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: Identity | None, years: int,
                 ca: bool, client: bool) -> x509.Certificate:
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.certificate.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=365 * years))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer.key if issuer else key, hashes.SHA256())


def make_ca(name: str) -> Identity:
    """A maker's CA: it signs factory certificates and ownership vouchers."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{name} device CA")])
    return Identity(key, _certificate(subject, key, None, CA_YEARS, ca=True, client=False))


def make_device(serial: str, maker: Identity) -> Identity:
    """A box's factory identity, naming ``serial``, issued by the maker CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, maker.name),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
                         x509.NameAttribute(NameOID.COMMON_NAME, serial)])
    return Identity(key, _certificate(subject, key, maker, DEVICE_YEARS, ca=False, client=True))


def make_owner(name: str) -> Identity:
    """An owner's signing identity (self-signed: a voucher pins it by its fingerprint)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return Identity(key, _certificate(subject, key, None, OWNER_YEARS, ca=False, client=False))


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (and ``ca`` is a CA)."""
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not constraints.ca:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def valid_now(cert: x509.Certificate, now: float) -> bool:
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def prove(identity: Identity, purpose: Purpose, now: float) -> tuple[str, str]:
    """A proof of the factory identity for ``purpose``: (certificate PEM, base64 signature)."""
    signature = identity.sign(proof_message(purpose, serial_of(identity.certificate), now))
    return pem(identity.certificate).decode(), base64.b64encode(signature).decode()


def verify_signature(cert: x509.Certificate, data: bytes, signature_b64: str) -> bool:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    try:
        public.verify(base64.b64decode(signature_b64, validate=True), data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def private_folder(folder: Path) -> None:
    """Make ``folder`` (0700: it holds private keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
