"""ECDSA P-256 keys and X.509 certificates for every identity the project issues or checks.

Provisioning's maker CA, factory identities and owner certificates (:mod:`provisioning.identity`) and the
appliance's local device CA, its broker's server certificate and each camera's or sensor's client
certificate (:mod:`appliance.devices`) are all made here. Private keys are written 0600 (PKCS#8, PEM);
certificates are PEM. P-256 is what a TPM or a secure element holds and what every MQTT client library
speaks.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.files import write_atomically

DAY = dt.timedelta(days=1)


class CertificateError(Exception):
    """A key or certificate is missing or unreadable; the message names the file and what it was for."""


@dataclass(frozen=True, slots=True)
class Identity:
    """A private key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def name(self) -> str:
        return common_name(self.certificate)

    def key_pem(self) -> bytes:
        return key_pem(self.key)

    def save(self, folder: Path, stem: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / f"{stem}.key", self.key_pem(), mode=0o600)
        write_atomically(folder / f"{stem}.pem", pem(self.certificate))

    @classmethod
    def load(cls, folder: Path, stem: str, what: str) -> Identity:
        key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.pem"
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except FileNotFoundError as e:
            raise CertificateError(f"{what}: {e.filename} does not exist") from e
        except (OSError, ValueError) as e:
            raise CertificateError(f"{what}: cannot read {key_path} or {cert_path}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{what}: {key_path} is not an ECDSA key")
        return cls(key, cert)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 of the certificate's DER bytes."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def load_certificate(data: bytes | str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data.encode() if isinstance(data, str) else data)
    except ValueError as e:
        raise CertificateError(f"{what} is not a PEM certificate ({e})") from e


def name(common: str, organization: str = "", serial: str = "") -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)] if organization else []
    if serial:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common)])


def issue(subject: x509.Name, issuer: Identity | None, days: int, *, ca: bool = False, client: bool = False,
          server_names: Sequence[str] = ()) -> Identity:
    """A new key and its certificate, signed by ``issuer`` (self-signed when None). ``server_names`` (host
    names or IP addresses) make it a TLS server certificate."""
    key = new_key()
    return Identity(key, certify(key.public_key(), subject, issuer, days, ca=ca, client=client,
                                 server_names=server_names, self_key=key))


def certify(public_key: ec.EllipticCurvePublicKey, subject: x509.Name, issuer: Identity | None, days: int, *,
            ca: bool = False, client: bool = False, server_names: Sequence[str] = (),
            self_key: ec.EllipticCurvePrivateKey | None = None) -> x509.Certificate:
    """A certificate for ``public_key`` (one that a CSR brought, or :func:`issue`'s new key), signed by
    ``issuer``, or self-signed by ``self_key`` when ``issuer`` is None."""
    signer = issuer.key if issuer is not None else self_key
    if signer is None:
        raise ValueError("a self-signed certificate needs its own key")
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.certificate.subject if issuer else subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + days * DAY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + \
             ([ExtendedKeyUsageOID.SERVER_AUTH] if server_names else [])
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in server_names]),
                                        critical=False)
    return builder.sign(signer, hashes.SHA256())


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def signing_request(key: ec.EllipticCurvePrivateKey, subject: x509.Name) -> bytes:
    """A CSR (PEM) for ``key``: the holder asks a CA to certify it, and proves it holds the key."""
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256()) \
        .public_bytes(serialization.Encoding.PEM)


def load_signing_request(data: str, what: str) -> ec.EllipticCurvePublicKey:
    """The P-256 public key a CSR asks to certify, once its signature shows the sender holds the key."""
    try:
        csr = x509.load_pem_x509_csr(data.encode())
    except ValueError as e:
        raise CertificateError(f"{what} is not a PEM certificate signing request ({e})") from e
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertificateError(f"{what}: the key must be ECDSA P-256")
    if not csr.is_signature_valid:
        raise CertificateError(f"{what}: its signature is not by the key it names")
    return key


def load_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise CertificateError(f"{what}: cannot read {path}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{what}: {path} is not an ECDSA key")
    return key


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*der) == key.public_key().public_bytes(*der)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def revocation_list(ca: Identity, revoked: Sequence[tuple[int, float]], days: int) -> bytes:
    """A CRL (PEM) signed by ``ca`` listing ``revoked`` (certificate serial number, revoked at)."""
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.certificate.subject)
               .last_update(now - dt.timedelta(minutes=5)).next_update(now + days * DAY))
    for number, at in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(number)
            .revocation_date(dt.datetime.fromtimestamp(at, dt.UTC)).build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


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
