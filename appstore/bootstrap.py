"""The AppStore's side of zero-touch provisioning (docs/provisioning.md): bootstrap and enrolment.

::

    DIR/makers/{name}.pem        maker CAs whose boxes may fetch bundles and enrol (appstore makers add)
    DIR/bootstrap/{serial}.json  the bundle an owner registered for a box (appstore bootstrap add, or
                                 PUT /v1/bootstrap/{serial} with an admin token)

A registered bundle is verified when it is registered, as the box will verify it (the maker's voucher,
the owner's certificate, the owner's signature, the dates), so a bad one is refused at the owner's office,
not on site. A box proves its factory identity (:class:`formats.provisioning.DeviceProof`: its certificate,
issued by a trusted maker CA, and a fresh signature by its key, for one purpose) to fetch its bundle
(``POST /v1/bootstrap/{serial}``) and to enrol (``POST /v1/enrol``), which registers it in the fleet under
the device id, channel and group its owner's configuration names. A proof is good for a few minutes and
once: a replayed one is refused. An enrolment may bring a CSR for the box's operational key, bound into the
proof; the fleet CA (:mod:`appstore.fleet_ca`) certifies that key for the device id, so a box can then
reach an AppStore that asks for client certificates.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from pathlib import Path

from cryptography import x509

from appstore.errors import AppStoreError, BadRequest, FleetError, Forbidden
from appstore.fleet import Fleet
from appstore.fleet_ca import FleetCA
from common.files import write_atomically
from formats.errors import FormatError
from formats.provisioning import DeviceProof, Enrolment, ProvisioningBundle, Purpose, proof_message
from pki.certs import CertificateError, common_name, issued_by, load_certificate, pem, valid_now, verify_signature
from provisioning.errors import Refused
from provisioning.identity import serial_of
from provisioning.verify import Verified, verify_bundle

PROOF_WINDOW_S = 300.0  # a proof is accepted this long either side of the AppStore's clock


class NotRegistered(AppStoreError):
    """No bundle is registered for this serial (404)."""


class Bootstrap:
    def __init__(self, folder: Path, fleet: Fleet) -> None:
        self.makers_dir = folder / "makers"
        self.bundles_dir = folder / "bootstrap"
        self.fleet = fleet
        self.fleet_ca = FleetCA(folder)
        self._seen: dict[str, float] = {}  # proofs accepted (by signature hash) -> when they expire
        self._lock = threading.Lock()

    # makers and registrations (the CLI, and admins over HTTP)

    def trust_maker(self, pem_bytes: bytes, where: str) -> str:
        try:
            ca = load_certificate(pem_bytes, where)
        except CertificateError as e:
            raise BadRequest(str(e)) from e
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", common_name(ca)).strip("-") or "maker"
        write_atomically(self.makers_dir / f"{name}.pem", pem_bytes)
        return common_name(ca)

    def makers(self) -> list[x509.Certificate]:
        if not self.makers_dir.is_dir():
            return []
        return [load_certificate(p.read_bytes(), str(p)) for p in sorted(self.makers_dir.glob("*.pem"))]

    def register(self, raw: bytes, where: str, serial: str | None = None) -> Verified:
        """Keep ``raw`` as the bundle its box fetches, once it verifies as the box will verify it."""
        makers = self.makers()
        if not makers:
            raise BadRequest("this AppStore trusts no maker yet; add the maker's CA first: appstore makers add CA.pem")
        try:
            probe = verify_bundle(raw, where, serial or _serial_in(raw), makers, None)
        except Refused as e:
            raise BadRequest(f"the bundle does not verify ({e}); nothing was registered") from e
        write_atomically(self.bundles_dir / f"{probe.conveyed.serial}.json", raw, mode=0o600)
        return probe

    def registered(self, serial: str) -> Verified:
        path = self.bundles_dir / f"{serial}.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotRegistered(f"no provisioning bundle is registered for box {serial}; its owner registers one "
                                "with `provision site make site.toml --register URL` or `appstore bootstrap add`") from None
        try:
            return verify_bundle(raw, str(path), serial, self.makers(), None)
        except Refused as e:
            raise Forbidden(f"the bundle registered for {serial} no longer verifies ({e}); its owner must register "
                            "a new one") from e

    # the box

    def prove(self, proof: DeviceProof, purpose: Purpose, serial: str | None = None) -> str:
        """The serial ``proof`` proves, or Forbidden with why."""
        if proof.purpose != purpose:
            raise Forbidden(f"this proof is for {proof.purpose}, not {purpose}")
        now = time.time()
        if abs(now - proof.time) > PROOF_WINDOW_S:
            raise Forbidden(f"the proof was made at {proof.time:.0f}, more than {PROOF_WINDOW_S:.0f} s from the "
                            f"AppStore's clock ({now:.0f}); check the box's clock")
        try:
            cert = load_certificate(proof.certificate, "the device certificate")
        except CertificateError as e:
            raise BadRequest(str(e)) from e
        if not any(issued_by(cert, ca) for ca in self.makers()):
            raise Forbidden("the device certificate was not issued by a maker this AppStore trusts "
                            "(appstore makers add CA.pem)")
        if not valid_now(cert, now):
            raise Forbidden("the device certificate is outside its validity dates")
        proven = serial_of(cert)
        if serial is not None and proven != serial:
            raise Forbidden(f"the device certificate is box {proven}'s, not {serial}'s")
        if not verify_signature(cert, proof_message(purpose, proven, proof.time, proof.csr), proof.signature):
            raise Forbidden("the proof's signature is not the device key's")
        key = hashlib.sha256(proof.signature.encode()).hexdigest()
        with self._lock:
            self._seen = {k: t for k, t in self._seen.items() if t > now}
            if key in self._seen:
                raise Forbidden("this proof was used already; make a new one")
            self._seen[key] = now + 2 * PROOF_WINDOW_S
        return proven

    def bundle_for(self, serial: str, proof: DeviceProof) -> bytes:
        self.prove(proof, "bootstrap", serial)
        self.registered(serial)
        return (self.bundles_dir / f"{serial}.json").read_bytes()

    def enrol(self, proof: DeviceProof) -> Enrolment:
        serial = self.prove(proof, "enrol")
        try:
            conveyed = self.registered(serial).conveyed
        except NotRegistered as e:
            raise Forbidden(f"box {serial} is not registered by its owner: {e}") from e
        certificate = None
        if proof.csr is not None:
            try:
                certificate = pem(self.fleet_ca.certify(proof.csr, conveyed.device_id)).decode()
            except CertificateError as e:
                raise BadRequest(f"{e}; the box makes a new one at its next try") from e
        try:
            token = self.fleet.enrol(conveyed.device_id, serial, conveyed.appstore.group, conveyed.appstore.channel)
        except FleetError as e:
            raise Forbidden(str(e)) from e
        return Enrolment(device_id=conveyed.device_id, token=token, channel=conveyed.appstore.channel,
                         group=conveyed.appstore.group, certificate=certificate)


def _serial_in(raw: bytes) -> str:
    """The serial a bundle says it is for (verified against the voucher and the conveyed information after)."""
    try:
        return ProvisioningBundle.parse(raw, "the bundle").serial
    except FormatError as e:
        raise BadRequest(f"{e}; make the bundle with `provision site make`") from e
