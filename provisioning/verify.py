"""A box checks a provisioning bundle in SZTP's order and refuses at the first check that fails.

1. ``bundle``: JSON, the bundle's shape, for this box's serial;
2. ``voucher``: signed by a maker CA this box holds as a trust anchor, inside its validity window, for
   this box's serial;
3. ``owner certificate``: the one the voucher pins (by SHA-256 fingerprint);
4. ``conveyed information``: signed by that owner, not expired, for this box's serial, and not older than
   the configuration already applied here (no replay); a box provisioned by one owner takes a new
   configuration only from the same owner (or after ``appliance factory-reset``).

Nothing is applied before every check has passed; the caller validates the settings last (the appliance's
settings tree) before it writes anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography import x509

from formats.errors import FormatError
from formats.provisioning import (
    CONVEYED_TYPE,
    MAX_BUNDLE_BYTES,
    VOUCHER_TYPE,
    ConveyedInformation,
    ProvisioningBundle,
    Voucher,
)
from pki.certs import CertificateError, common_name, fingerprint, load_certificate
from provisioning.envelope import open_signed
from provisioning.errors import Refused

CLOCK_SKEW_S = 300.0  # a box's clock may be this far behind the signer's (no time sync yet at first boot)


@dataclass(frozen=True, slots=True)
class Applied:
    """What is applied on this box already: the owner's fingerprint and the conveyed information's version."""

    owner: str
    version: int


@dataclass(frozen=True, slots=True)
class Verified:
    conveyed: ConveyedInformation
    voucher: Voucher
    owner: str  # the owner certificate's fingerprint
    owner_name: str
    maker: str  # the maker CA's name that signed the voucher
    fresh: bool  # False: this exact configuration (owner and version) is applied here already


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def verify_bundle(raw: bytes, where: str, serial: str, makers: list[x509.Certificate], applied: Applied | None,
                  now: float | None = None) -> Verified:
    """The verified bundle ``raw`` (from ``where``: a path or URL, for the messages), or :class:`Refused`."""
    now = time.time() if now is None else now
    if len(raw) > MAX_BUNDLE_BYTES:
        raise Refused("bundle", f"{where} is {len(raw)} bytes; a provisioning bundle is at most {MAX_BUNDLE_BYTES}")
    try:
        bundle = ProvisioningBundle.parse(raw, where)
    except FormatError as e:
        raise Refused("bundle", f"{e}; make the bundle again with `provision site make`") from e
    if bundle.serial != serial:
        raise Refused("bundle", f"{where} is for box {bundle.serial}, not for this box ({serial})")

    if not makers:
        raise Refused("voucher", "this box holds no maker CA to check vouchers against; it was not given a "
                                 "factory identity (provision device make)")
    voucher: Voucher | None = None
    maker = ""
    last: Refused | None = None
    for ca in makers:
        try:
            voucher = open_signed(bundle.voucher, VOUCHER_TYPE, Voucher, ca, "voucher", f"the maker ({common_name(ca)})")
            maker = common_name(ca)
            break
        except Refused as e:
            last = e
    if voucher is None:
        assert last is not None
        raise Refused("voucher", f"not signed by a maker this box trusts ({', '.join(common_name(c) for c in makers)})"
                                 f": {last.reason}; ask the maker for a voucher for {serial}")
    if now + CLOCK_SKEW_S < voucher.created:
        raise Refused("voucher", f"not valid before {_when(voucher.created)}; check the box's clock")
    if now >= voucher.expires:
        raise Refused("voucher", f"expired on {_when(voucher.expires)}; ask the maker for a new voucher "
                                 f"(provision voucher {serial} --owner OWNER_CERT)")
    if voucher.serial != serial:
        raise Refused("voucher", f"the voucher is for box {voucher.serial}, not for this box ({serial})")

    try:
        owner_cert = load_certificate(bundle.owner_certificate, "the owner certificate")
    except CertificateError as e:
        raise Refused("owner certificate", str(e)) from e
    owner = fingerprint(owner_cert)
    if owner != voucher.owner_cert_sha256:
        raise Refused("owner certificate", f"the bundle's owner certificate ({common_name(owner_cert)}, "
                                           f"{owner[:16]}…) is not the one the voucher names ({voucher.owner}, "
                                           f"{voucher.owner_cert_sha256[:16]}…)")

    conveyed = open_signed(bundle.conveyed, CONVEYED_TYPE, ConveyedInformation, owner_cert, "conveyed information",
                           f"the owner the voucher names ({voucher.owner})")
    if now >= conveyed.expires:
        raise Refused("conveyed information", f"expired on {_when(conveyed.expires)}; make the site configuration "
                                              "again (provision site make)")
    if conveyed.serial != serial:
        raise Refused("conveyed information", f"made for box {conveyed.serial}, not for this box ({serial})")
    fresh = True
    if applied is not None:
        if applied.owner != owner:
            raise Refused("conveyed information", "this box was provisioned by another owner; only that owner may "
                                                  "provision it again, or reset it first (appliance factory-reset)")
        if conveyed.version < applied.version:
            raise Refused("conveyed information", f"version {conveyed.version} is older than version "
                                                  f"{applied.version}, applied here already: an old configuration "
                                                  "replayed; make a new one (provision site make)")
        fresh = conveyed.version > applied.version
    return Verified(conveyed, voucher, owner, voucher.owner, maker, fresh)
