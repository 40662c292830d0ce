"""Making the signed documents: the maker's voucher, the owner's conveyed information (from ``site.toml``),
and the bundle that carries both with the owner's certificate.

``site.toml`` (docs/provisioning.md)::

    serial = "SN-0001"            # the box, as its factory certificate names it
    device_id = "mine3-shaft-a"   # its name in the fleet and on MQTT
    site = "Mine 3, shaft A"
    timezone = "Asia/Shanghai"
    valid_days = 30               # how long the box accepts this configuration (default 30)
    # version = 7                 # grows with each new configuration (default: the time it was made)
    [appstore]
    url = "https://appstore.example.com/"
    root = "root.json"            # the TUF root the box will trust (a path beside site.toml)
    channel = "stable"
    group = "canary"
    # ca = "appstore-ca.pem"      # HTTPS with a private CA: the CA that signed the AppStore's certificate
    # enrol_url = "https://appstore.example.com:8443/"   # where boxes enrol, when url asks for client certificates
    [admin]                       # the site's first console admin
    name = "site-admin"
    password_hash = "scrypt$..."  # appliance users hash-password; never the password
    [settings]                    # the appliance's settings tree: broker, samples, partitions, http, ...
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from formats.errors import describe_validation_error
from formats.provisioning import (
    CONVEYED_TYPE,
    VOUCHER_TYPE,
    ConveyedInformation,
    Envelope,
    ProvisioningBundle,
    Voucher,
)
from pki.certs import Identity, common_name, fingerprint, load_certificate, pem
from provisioning.envelope import sign
from provisioning.errors import ProvisioningError

DAY_S = 86400.0


def make_voucher(maker: Identity, serial: str, owner_cert_pem: bytes, days: float, now: float | None = None) -> bytes:
    """The maker's signed voucher (a DSSE envelope, JSON) binding ``serial`` to the owner's certificate."""
    now = time.time() if now is None else now
    owner = load_certificate(owner_cert_pem, "the owner certificate")
    try:
        voucher = Voucher(serial=serial, owner=common_name(owner), owner_cert_sha256=fingerprint(owner),
                          maker=maker.name, created=now, expires=now + days * DAY_S)
    except ValidationError as e:
        raise ProvisioningError(describe_validation_error(e, "voucher", docs="docs/provisioning.md")) from e
    return sign(voucher, VOUCHER_TYPE, maker).model_dump_json(by_alias=True, indent=1).encode()


def read_site(path: Path, now: float | None = None) -> ConveyedInformation:
    """The conveyed information ``site.toml`` describes (paths in it are relative to its folder)."""
    now = time.time() if now is None else now
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except OSError as e:
        raise ProvisioningError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ProvisioningError(f"{path}: not valid TOML: {e}") from e
    days = data.pop("valid_days", 30)
    if not isinstance(days, (int, float)) or days <= 0:
        raise ProvisioningError(f"{path}: valid_days must be a positive number of days, not {days!r}")
    store = data.get("appstore")
    if isinstance(store, dict):
        store = dict(store)
        root = store.get("root")
        if not isinstance(root, str):
            raise ProvisioningError(f"{path}: appstore.root must name the trusted TUF root.json (a path)")
        store["root"] = _json_file(path.parent / root, f"{path}: appstore.root")
        if isinstance(store.get("ca"), str):
            store["ca_pem"] = _read(path.parent / store.pop("ca"), f"{path}: appstore.ca")
        data["appstore"] = store
    data.setdefault("version", int(now))
    try:
        return ConveyedInformation.model_validate({**data, "created": now, "expires": now + float(days) * DAY_S})
    except ValidationError as e:
        raise ProvisioningError(describe_validation_error(e, str(path), docs="docs/provisioning.md")) from e


def make_bundle(voucher_json: bytes, owner: Identity, conveyed: ConveyedInformation, where: str) -> bytes:
    """``provisioning.json``: the voucher, the owner's certificate and the conveyed information signed by it."""
    try:
        voucher = Envelope.model_validate_json(voucher_json)
    except ValidationError as e:
        raise ProvisioningError(f"{where} is not a voucher: {describe_validation_error(e, where)}") from e
    bundle = ProvisioningBundle(serial=conveyed.serial, voucher=voucher, owner_certificate=pem(owner.certificate).decode(),
                                conveyed=sign(conveyed, CONVEYED_TYPE, owner))
    return bundle.model_dump_json(by_alias=True, indent=1).encode()


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ProvisioningError(f"{what}: cannot read {path}: {e.strerror}") from e


def _json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_read(path, what))
    except ValueError as e:
        raise ProvisioningError(f"{what}: {path} is not JSON ({e})") from e
    if not isinstance(value, dict) or "signed" not in value:
        raise ProvisioningError(f"{what}: {path} is not a TUF root.json (give the AppStore's metadata/1.root.json)")
    return value
