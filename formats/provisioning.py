"""Zero-touch provisioning's documents (docs/provisioning.md), declared once for the maker's and owner's
tools (``provision``), the box's first-boot agent and the AppStore's bootstrap and enrolment routes.

Three parties sign in a chain, in the spirit of RFC 8572 (SZTP):

- the **maker** gives each box a factory identity (an ECDSA P-256 key and a certificate naming its serial,
  signed by the maker's CA) and the maker CA's certificate as the box's trust anchor;
- the **ownership voucher**, signed by the maker: this serial belongs to the owner whose certificate has
  this SHA-256 fingerprint, from ``created`` until ``expires``;
- the **conveyed information**, signed by that owner: what the site needs (device id, AppStore, trusted
  TUF root, channel, settings, the first console admin), for this serial, with a ``version`` that only
  grows, so an old configuration cannot be replayed.

Signed documents travel as DSSE envelopes (securesystemslib's); :class:`ProvisioningBundle` carries the
voucher, the owner's certificate and the conveyed information together, on a USB stick or from the
AppStore's bootstrap endpoint. :class:`DeviceProof` is how a box proves its factory identity to the
AppStore (to fetch its bundle and to enrol).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from formats.errors import parse_json_document

SERIAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

VOUCHER_TYPE = "application/vnd.edge-appliance.voucher+json"
CONVEYED_TYPE = "application/vnd.edge-appliance.conveyed-information+json"
BUNDLE_FILE = "provisioning.json"  # its name on a USB stick: <stick>/appliance/<serial>/provisioning.json
MAX_BUNDLE_BYTES = 1024 * 1024  # a bundle is a few kilobytes (the TUF root is the largest part)
USB_PATHS = ("/media/*", "/media/*/*", "/run/media/*/*", "/mnt/*")  # where a USB stick is mounted on Debian

Purpose = Literal["bootstrap", "enrol"]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Voucher(_Doc):
    """The maker's word that ``serial`` belongs to the owner whose certificate has ``owner_cert_sha256``."""

    schema_version: Literal[1] = Field(default=1, alias="schema")
    serial: str = Field(pattern=SERIAL_PATTERN)
    owner: str = Field(min_length=1, max_length=200)  # the owner's name, as its certificate says it
    owner_cert_sha256: str = Field(pattern=SHA256_PATTERN)  # of the owner certificate's DER bytes
    maker: str = Field(min_length=1, max_length=200)
    created: float  # epoch seconds
    expires: float


class Admin(_Doc):
    """The site's first console admin: a name and a password hash (``appliance users hash-password``),
    never the password."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
    password_hash: str = Field(min_length=1, max_length=500)


class ConveyedAppStore(_Doc):
    url: str = Field(pattern=r"^https?://")
    root: dict[str, Any]  # the TUF root.json the box will trust, as a JSON object
    channel: str = Field(default="stable", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    group: str = ""
    ca_pem: str = ""  # HTTPS: the CA that signed the AppStore's certificate ("" : the system's)
    # where the box enrols, when the AppStore's main address asks for a client certificate the box does not
    # have yet (``appstore serve --client-certificates --bootstrap-port``); None: ``url``
    enrol_url: str | None = Field(default=None, pattern=r"^https?://")


class ConveyedInformation(_Doc):
    """What the owner tells one box: signed by the owner, for one serial, newer than what it replaces."""

    schema_version: Literal[1] = Field(default=1, alias="schema")
    serial: str = Field(pattern=SERIAL_PATTERN)
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    version: int = Field(ge=1)  # grows with each configuration the owner makes for this serial
    created: float
    expires: float
    site: str = Field(default="", max_length=200)
    timezone: str = ""  # IANA name, e.g. Asia/Shanghai; "" keeps the box's
    appstore: ConveyedAppStore
    settings: dict[str, Any] = Field(default_factory=dict)  # the appliance's settings tree (docs/configuration.md)
    admin: Admin | None = None


class Envelope(_Doc):
    """A DSSE envelope as JSON (https://github.com/secure-systems-lab/dsse)."""

    payload: str = Field(min_length=1)  # base64
    payload_type: str = Field(alias="payloadType")
    signatures: list[dict[str, str]] = Field(min_length=1, max_length=8)


class ProvisioningBundle(_Doc):
    """``provisioning.json``: everything a box needs to verify and apply its site configuration."""

    schema_version: Literal[1] = Field(default=1, alias="schema")
    serial: str = Field(pattern=SERIAL_PATTERN)
    voucher: Envelope
    owner_certificate: str = Field(min_length=1, max_length=16_000)  # PEM
    conveyed: Envelope

    @classmethod
    def parse(cls, raw: bytes, where: str) -> ProvisioningBundle:
        return parse_json_document(cls, raw, where)


class DeviceProof(_Doc):
    """A box's proof of its factory identity: its certificate and its signature, by the factory key, over
    :func:`proof_message`. Good for a few minutes, for one purpose."""

    certificate: str = Field(min_length=1, max_length=16_000)  # PEM, signed by a maker CA the AppStore trusts
    purpose: Purpose
    time: float
    signature: str = Field(min_length=1, max_length=400)  # base64 DER ECDSA signature
    # enrolment: a CSR (PEM) for the box's operational key, bound into the signed message, so that the
    # fleet CA certifies the key of the box that proved itself, and no other
    csr: str | None = Field(default=None, min_length=1, max_length=4_000)


def proof_message(purpose: Purpose, serial: str, time: float, csr: str | None = None) -> bytes:
    bound = f"{hashlib.sha256(csr.encode()).hexdigest()}\n" if csr else ""
    return f"edge-appliance {purpose}\n{serial}\n{time:.3f}\n{bound}".encode()


class Registration(_Doc):
    """``PUT /v1/bootstrap/{serial}`` (an AppStore admin): the bundle for that serial, and where it enrols."""

    bundle: ProvisioningBundle


class Enrolment(_Doc):
    """The answer to ``POST /v1/enrol``: the box's operational identity in the fleet."""

    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    token: str = Field(min_length=16)
    channel: str
    group: str = ""
    certificate: str | None = None  # PEM: the fleet CA's client certificate for the CSR's key, when one was sent


class FactoryInfo(_Doc):
    """``factory/factory.json`` in a box's state folder, written by ``provision device make``: its serial and
    where its first-boot agent looks for a bundle (USB paths first, then the bootstrap URLs)."""

    schema_version: Literal[1] = Field(default=1, alias="schema")
    serial: str = Field(pattern=SERIAL_PATTERN)
    maker: str
    bootstrap_urls: list[str] = Field(default_factory=list)
    usb_paths: list[str] = Field(default_factory=lambda: list(USB_PATHS))


StepOutcome = Literal["ok", "refused", "waiting"]
ProvisionStateName = Literal["unprovisioned", "applied", "provisioned"]


class ProvisionStep(_Doc):
    ts: float
    step: str  # find, bundle, voucher, owner certificate, conveyed information, settings, apply, enrol
    outcome: StepOutcome
    message: str
    source: str = ""  # the USB path or bootstrap URL it concerns


class ProvisionState(_Doc):
    """``STATE/provisioning/state.json``: where the first-boot agent is (the console's Provisioning page)."""

    model_config = ConfigDict(extra="forbid", frozen=False, populate_by_name=True)

    schema_version: Literal[1] = Field(default=1, alias="schema")
    state: ProvisionStateName = "unprovisioned"
    serial: str = ""
    owner: str = ""  # the owner certificate's fingerprint
    owner_name: str = ""
    version: int = 0  # of the conveyed information applied
    device_id: str = ""
    site: str = ""
    source: str = ""  # where the applied bundle came from
    applied: float | None = None
    enrolled: float | None = None
    steps: list[ProvisionStep] = Field(default_factory=list)  # the latest last
