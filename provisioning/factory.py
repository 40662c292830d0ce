"""A box's factory identity, in ``STATE/factory/`` (kept by ``appliance factory-reset``)::

    factory/device.key     the box's private key (0600; on real hardware it would stay in a TPM)
    factory/device.pem     its certificate: the serial, signed by the maker CA
    factory/maker-ca.pem   the maker CA: the trust anchor for ownership vouchers
    factory/factory.json   the serial, and where to look for a bundle (formats.provisioning.FactoryInfo)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from common.files import write_atomically
from formats.errors import FormatError, load_json_document
from formats.provisioning import USB_PATHS, FactoryInfo
from pki.certs import CertificateError, Identity, load_certificate, pem, private_folder
from provisioning.errors import ProvisioningError
from provisioning.identity import make_device, serial_of

FOLDER = "factory"


@dataclass(frozen=True, slots=True)
class Factory:
    folder: Path
    info: FactoryInfo
    identity: Identity
    makers: list[x509.Certificate]

    @property
    def serial(self) -> str:
        return self.info.serial

    @classmethod
    def load(cls, state_dir: Path) -> Factory:
        folder = state_dir / FOLDER
        if not (folder / "factory.json").is_file():
            raise ProvisioningError(f"{folder} holds no factory identity: this box was not made with "
                                    "`provision device make SERIAL --state-dir STATE` (docs/provisioning.md)")
        try:
            info = load_json_document(FactoryInfo, folder / "factory.json")
        except FormatError as e:
            raise ProvisioningError(str(e)) from e
        try:
            identity = Identity.load(folder, "device", "the factory identity")
            maker = load_certificate((folder / "maker-ca.pem").read_bytes(), f"{folder}/maker-ca.pem")
        except CertificateError as e:
            raise ProvisioningError(str(e)) from e
        except OSError as e:
            raise ProvisioningError(f"{folder}/maker-ca.pem: cannot read: {e.strerror}") from e
        if serial_of(identity.certificate) != info.serial:
            raise ProvisioningError(f"{folder}: device.pem names serial {serial_of(identity.certificate)!r}, "
                                    f"factory.json {info.serial!r}")
        return cls(folder, info, identity, [maker])


def make_factory(state_dir: Path, serial: str, maker: Identity, bootstrap_urls: list[str],
                 usb_paths: list[str] | None = None) -> Factory:
    """Give a box its factory identity (``provision device make``)."""
    folder = state_dir / FOLDER
    if (folder / "factory.json").exists():
        raise ProvisioningError(f"{folder} holds a factory identity already; a box gets one once")
    try:
        info = FactoryInfo(serial=serial, maker=maker.name, bootstrap_urls=bootstrap_urls,
                           usb_paths=list(usb_paths) if usb_paths is not None else list(USB_PATHS))
    except ValueError as e:
        raise ProvisioningError(f"serial {serial!r} is not valid: use letters, digits, '.', '_' and '-'") from e
    private_folder(folder)
    identity = make_device(serial, maker)
    identity.save(folder, "device")
    write_atomically(folder / "maker-ca.pem", pem(maker.certificate))
    write_atomically(folder / "factory.json", info.model_dump_json(by_alias=True, indent=1).encode())
    return Factory(folder, info, identity, [maker.certificate])
