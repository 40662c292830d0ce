"""The appliance's side of zero-touch provisioning (docs/provisioning.md): ``appliance provision`` and
``appliance factory-reset``.

``provisioning`` finds and verifies a bundle; this module applies what it verified to this appliance and
enrols it through ``appstore_client``:

- the settings file: the factory's settings (kept the first time as ``provisioning/factory-settings.toml``)
  with the owner's ``settings`` tree over them, and the device id, AppStore, channel, group and time zone
  the conveyed information names; validated as the daemon validates it before anything is written;
- the trusted TUF root (and the AppStore's CA) in ``STATE/provisioning/``, where the settings point;
- the first console admin, only when the box has no admin yet.

The settings file is written last (one atomic rename): a power cut before it leaves the box unprovisioned
and the next start applies the bundle again, which is safe to repeat.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from pydantic import ValidationError

from appliance.auth.passwords import is_password_hash
from appliance.errors import ApplianceError
from appliance.settings import Settings, merge_trees
from appliance.store import Store
from appstore_client.connection import Connection, ConnectionOptions
from appstore_client.errors import Refused as AppStoreRefused
from appstore_client.errors import Unreachable
from appstore_client.fleet import enrol, fetch_bundle
from common.files import write_atomically
from formats.errors import describe_validation_error
from formats.provisioning import ConveyedInformation, DeviceProof, Purpose
from pki.certs import CertificateError, key_pem, load_certificate, load_key, name, new_key, same_key, signing_request
from provisioning.agent import Agent, Source, Unavailable, UsbSource
from provisioning.errors import ProvisioningError, Refused
from provisioning.factory import FOLDER as FACTORY_FOLDER
from provisioning.factory import Factory
from provisioning.identity import prove
from provisioning.verify import Verified

log = logging.getLogger(__name__)

FOLDER = "provisioning"
SET_BY_CONVEYED = ("device_id", "state_dir", "appstore", "timezone")  # keys the conveyed information sets itself
ACTOR = "provisioning"
# what a factory reset keeps in the state folder: the factory identity, and the installed software (the
# launcher's releases, links, wheel store, uv cache and history), which is the box's, not the site's
KEPT_BY_RESET = frozenset({FACTORY_FOLDER, "releases", "current", "previous", "wheels", "cache", "launcher.json",
                           "launcher.child"})


def proof(factory: Factory, purpose: Purpose, csr: str | None = None) -> DeviceProof:
    now = time.time()
    certificate, signature = prove(factory.identity, purpose, now, csr)
    return DeviceProof(certificate=certificate, purpose=purpose, time=now, signature=signature, csr=csr)


@dataclass(frozen=True, slots=True)
class BootstrapSource:
    """An AppStore's bootstrap endpoint, asked with a proof of the box's factory identity."""

    url: str
    factory: Factory

    @property
    def name(self) -> str:
        return f"bootstrap {self.url}"

    def fetch(self) -> list[tuple[str, bytes]]:
        conn = Connection(ConnectionOptions(url=self.url))
        try:
            raw = fetch_bundle(conn, self.factory.serial, proof(self.factory, "bootstrap"))
        except Unreachable as e:
            raise Unavailable(f"{e}; trying again") from e
        except AppStoreRefused as e:
            raise Unavailable(f"{e}; trying again") from e
        finally:
            conn.close()
        where = f"{conn.base_url}/v1/bootstrap/{self.factory.serial}"
        return [] if raw is None else [(where, raw)]


class Provisioner:
    """Applies verified bundles to the appliance whose factory settings are ``config_file``."""

    def __init__(self, config_file: Path, settings: Settings) -> None:
        self.config_file = config_file
        self.state_dir = settings.state_dir.resolve()
        self.folder = self.state_dir / FOLDER
        self.factory_settings = self.folder / "factory-settings.toml"
        # the operational identity: a key made here, certified by the AppStore's fleet CA at enrolment
        self.client_key = self.folder / "appstore-client.key"
        self.client_cert = self.folder / "appstore-client.pem"

    def base(self) -> dict[str, Any]:
        """The settings as the factory left them (saved before the first provisioning changes them)."""
        if not self.factory_settings.is_file():
            raw = self.config_file.read_bytes() if self.config_file.is_file() else b""
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(self.factory_settings, raw, mode=0o600)
        return tomllib.loads(self.factory_settings.read_text())

    def tree(self, conveyed: ConveyedInformation, token: str | None, client_certificate: bool = False) -> dict[str, Any]:
        for key in SET_BY_CONVEYED:
            if key in conveyed.settings:
                raise Refused("settings", f"settings.{key}: set by the conveyed information itself (its "
                                          f"{'appstore section' if key == 'appstore' else key}); remove it from "
                                          "[settings] in site.toml")
        base = self.base()
        tree = merge_trees(base, conveyed.settings)
        tree["device_id"] = conveyed.device_id
        tree["state_dir"] = str(self.state_dir)
        if conveyed.timezone:
            tree["timezone"] = conveyed.timezone
        store = conveyed.appstore
        appstore: dict[str, Any] = {**base.get("appstore", {}), "url": store.url, "root": str(self.folder / "root.json"),
                                    "channel": store.channel, "group": store.group}
        if store.ca_pem:
            appstore["ca_file"] = str(self.folder / "appstore-ca.pem")
        if token:
            appstore["device_token"] = token
        if client_certificate:
            appstore["cert_file"], appstore["key_file"] = str(self.client_cert), str(self.client_key)
        tree["appstore"] = appstore
        if conveyed.site:
            tree.setdefault("samples", {}).setdefault("site", conveyed.site)
        try:
            Settings.model_validate(tree)
        except ValidationError as e:
            raise Refused("settings", describe_validation_error(e, "settings", docs="docs/configuration.md")
                          .replace("\n", "; ")) from e
        return tree

    def apply(self, verified: Verified, where: str) -> None:
        c = verified.conveyed
        tree = self.tree(c, token=None)
        if c.admin is not None and not is_password_hash(c.admin.password_hash):
            raise Refused("admin", "admin.password_hash is not a password hash this appliance reads; make one "
                                   "with `appliance users hash-password`")
        write_atomically(self.folder / "root.json", json.dumps(c.appstore.root).encode())
        if c.appstore.ca_pem:
            write_atomically(self.folder / "appstore-ca.pem", c.appstore.ca_pem.encode())
        with Store(self.state_dir / "appliance.db") as store:
            if c.admin is not None and not any(u.role == "admin" for u in store.users.all()):
                store.users.add(c.admin.name, "admin", c.admin.password_hash)
                store.audit_log.add(ACTOR, "users.add", {"user": c.admin.name, "role": "admin",
                                                         "by": verified.owner_name}, "local")
            store.audit_log.add(ACTOR, "provisioning.apply", {
                "owner": verified.owner_name, "owner_sha256": verified.owner, "version": c.version,
                "device_id": c.device_id, "site": c.site, "source": where, "maker": verified.maker}, "local")
        self._write_settings(tree)

    def enrol(self, factory: Factory, conveyed: ConveyedInformation) -> None:
        key = self._operational_key()
        csr = signing_request(key, name(conveyed.device_id)).decode()
        folder_ca = self.folder / "appstore-ca.pem"
        conn = Connection(ConnectionOptions(url=conveyed.appstore.enrol_url or conveyed.appstore.url,
                                            ca_file=folder_ca if conveyed.appstore.ca_pem else None))
        try:
            answer = enrol(conn, proof(factory, "enrol", csr))
        except Unreachable as e:
            raise Unavailable(f"{e}; trying again") from e
        except AppStoreRefused as e:
            raise Refused("enrol", f"{e}; trying again (the owner registers the box with `provision site make "
                                   "--register`)") from e
        finally:
            conn.close()
        if answer.device_id != conveyed.device_id:
            raise Refused("enrol", f"the AppStore enrolled this box as {answer.device_id}, but its configuration "
                                   f"names {conveyed.device_id}")
        if answer.certificate is not None:
            try:
                cert = load_certificate(answer.certificate, "the AppStore's client certificate for this box")
            except CertificateError as e:
                raise Refused("enrol", f"{e}; trying again") from e
            if not same_key(cert, key):
                raise Refused("enrol", "the AppStore's client certificate is not for this box's key; trying again")
            write_atomically(self.client_cert, answer.certificate.encode())
        self._write_settings(self.tree(conveyed, token=answer.token, client_certificate=answer.certificate is not None))
        with Store(self.state_dir / "appliance.db") as store:
            store.audit_log.add(ACTOR, "provisioning.enrol", {"appstore": conveyed.appstore.url,
                                                              "device_id": answer.device_id,
                                                              "channel": answer.channel, "group": answer.group,
                                                              "client_certificate": answer.certificate is not None},
                                "local")

    def _operational_key(self) -> EllipticCurvePrivateKey:
        """Made once and kept (0600), so that a retry after a lost answer asks for the same key."""
        if self.client_key.is_file():
            try:
                return load_key(self.client_key, "the box's AppStore client key")
            except CertificateError as e:
                log.warning("%s; making a new one", e)
        key = new_key()
        write_atomically(self.client_key, key_pem(key), mode=0o600)
        return key

    def _write_settings(self, tree: dict[str, Any]) -> None:
        text = "# written by `appliance provision` from the owner's signed site configuration; the factory's\n" \
               f"# settings are kept in {self.factory_settings}\n" + tomli_w.dumps(tree)
        write_atomically(self.config_file, text.encode(), mode=0o600)


def agent(config_file: Path, settings: Settings, usb: list[str] | None = None) -> Agent:
    try:
        factory = Factory.load(settings.state_dir)
    except ProvisioningError as e:
        raise ApplianceError(str(e)) from e
    provisioner = Provisioner(config_file, settings)
    sources: list[Source] = [UsbSource(tuple(usb if usb is not None else factory.info.usb_paths), factory.serial)]
    sources += [BootstrapSource(url, factory) for url in factory.info.bootstrap_urls]
    return Agent(factory, provisioner.folder / "state.json", sources, provisioner.apply,
                 lambda conveyed: provisioner.enrol(factory, conveyed), provisioner.folder / "conveyed.json")


def factory_reset(config_file: Path, settings: Settings) -> list[str]:
    """Wipe the site's state (database, models, snapshots, samples, upgrade snapshots, provisioning) and put
    the factory's settings back; the factory identity and the installed releases stay. Returns what was
    removed."""
    state = settings.state_dir.resolve()
    if not (state / FACTORY_FOLDER / "factory.json").is_file():
        raise ApplianceError(f"{state} holds no factory identity; factory-reset keeps one and there is none here")
    factory_settings = state / FOLDER / "factory-settings.toml"
    original = factory_settings.read_bytes() if factory_settings.is_file() else None
    removed = []
    for entry in sorted(state.iterdir()):
        if entry.name in KEPT_BY_RESET:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    if original is not None:
        write_atomically(config_file, original, mode=0o600)
    return removed
