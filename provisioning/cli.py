"""``provision``: the maker's and the owner's side of zero-touch provisioning (docs/provisioning.md).

At the factory::

    provision maker init --dir MAKER --name "Acme Edge"
    provision device make SN-0001 --maker MAKER --state-dir BOX_STATE --bootstrap-url https://store.example/

At the owner's office::

    provision owner init --dir OWNER --name "Coal Group Ops"
    provision voucher SN-0001 --maker MAKER --owner OWNER/owner.pem --out SN-0001.voucher.json   (the maker)
    provision site make site.toml --owner OWNER --voucher SN-0001.voucher.json --out STICK [--register URL]

``site make`` writes ``STICK/appliance/SN-0001/provisioning.json`` (copy STICK's contents to a USB stick) and,
with ``--register``, registers the bundle with the AppStore's bootstrap endpoint (an admin token in
``APPSTORE_TOKEN``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from common.files import write_atomically
from formats.provisioning import BUNDLE_FILE
from pki.certs import CertificateError, Identity, private_folder
from provisioning.documents import make_bundle, make_voucher, read_site
from provisioning.errors import ProvisioningError
from provisioning.factory import make_factory
from provisioning.identity import make_ca, make_owner

TOKEN_ENV = "APPSTORE_TOKEN"


def _init(folder: Path, stem: str, make: Callable[[str], Identity], name: str, what: str) -> Identity:
    """Make an identity once: ``folder/stem.key`` (0600, in a 0700 folder) and ``folder/stem.pem``."""
    if (folder / f"{stem}.key").exists():
        raise ProvisioningError(f"{folder} holds {what} already ({stem}.key); it is made once")
    private_folder(folder)
    identity = make(name)
    identity.save(folder, stem)
    return identity


def cmd_maker_init(args: argparse.Namespace) -> int:
    ca = _init(Path(args.dir), "ca", make_ca, args.name, "a maker CA")
    print(f"made the maker CA {ca.name!r} in {args.dir} (ca.pem is public: give it to the AppStore with "
          "`appstore makers add`; keep ca.key offline)")
    return 0


def cmd_device_make(args: argparse.Namespace) -> int:
    maker = Identity.load(Path(args.maker), "ca", "the maker CA")
    factory = make_factory(Path(args.state_dir), args.serial, maker, list(args.bootstrap_url),
                           list(args.usb_path) if args.usb_path else None)
    print(f"gave box {factory.serial} its factory identity in {factory.folder} (bootstrap: "
          f"{', '.join(factory.info.bootstrap_urls) or 'USB only'})")
    return 0


def cmd_owner_init(args: argparse.Namespace) -> int:
    owner = _init(Path(args.dir), "owner", make_owner, args.name, "an owner identity")
    print(f"made the owner identity {owner.name!r} in {args.dir} (owner.pem goes to the maker for vouchers; "
          "keep owner.key safe: it signs every site configuration)")
    return 0


def cmd_voucher(args: argparse.Namespace) -> int:
    maker = Identity.load(Path(args.maker), "ca", "the maker CA")
    owner_pem = _read(Path(args.owner), "the owner certificate")
    voucher = make_voucher(maker, args.serial, owner_pem, args.days)
    out = Path(args.out or f"{args.serial}.voucher.json")
    write_atomically(out, voucher)
    print(f"wrote the ownership voucher for {args.serial} to {out} (valid {args.days:g} days)")
    return 0


def cmd_site_make(args: argparse.Namespace) -> int:
    owner = Identity.load(Path(args.owner), "owner", "the owner identity")
    conveyed = read_site(Path(args.site))
    voucher_path = Path(args.voucher)
    bundle = make_bundle(_read(voucher_path, "the voucher"), owner, conveyed, str(voucher_path))
    if args.out:
        path = Path(args.out) / "appliance" / conveyed.serial / BUNDLE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, bundle, mode=0o600)
        print(f"wrote {path} (version {conveyed.version}): copy {args.out}'s contents to the root of a USB stick")
    if args.register:
        answer = register(args.register, conveyed.serial, bundle)
        print(f"registered box {conveyed.serial} with {args.register} as {answer.get('device_id')} "
              f"(version {answer.get('version')}): it fetches its configuration at first boot")
    if not args.out and not args.register:
        raise ProvisioningError("say where the bundle goes: --out FOLDER (a USB stick) and/or --register URL")
    return 0


def register(url: str, serial: str, bundle: bytes) -> dict[str, object]:
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ProvisioningError(f"--register needs an AppStore admin token in {TOKEN_ENV} (appstore admin-token)")
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/bootstrap/{serial}", data=bundle, method="PUT",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            answer: dict[str, object] = json.load(r)
            return answer
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read()).get("error", "")
        except ValueError:
            reason = ""
        raise ProvisioningError(f"the AppStore refused the bundle: HTTP {e.code} {reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ProvisioningError(f"the AppStore at {url} cannot be reached ({getattr(e, 'reason', e)})") from e


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ProvisioningError(f"{what}: cannot read {path}: {e.strerror}") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="provision", description="Zero-touch provisioning: the maker's and the "
                                "owner's tools (docs/provisioning.md).")
    sub = p.add_subparsers(dest="command", required=True)

    maker = sub.add_parser("maker", help="the maker's CA").add_subparsers(dest="action", required=True)
    mi = maker.add_parser("init", help="make the maker's CA (once)")
    mi.add_argument("--dir", required=True, help="folder for ca.key and ca.pem")
    mi.add_argument("--name", required=True, help="the maker's name, e.g. 'Acme Edge'")
    mi.set_defaults(func=cmd_maker_init)

    device = sub.add_parser("device", help="a box's factory identity").add_subparsers(dest="action", required=True)
    dm = device.add_parser("make", help="give a box its factory identity (key, certificate, trust anchor)")
    dm.add_argument("serial")
    dm.add_argument("--maker", required=True, help="the maker CA's folder")
    dm.add_argument("--state-dir", required=True, help="the box's state folder (/var/lib/appliance)")
    dm.add_argument("--bootstrap-url", action="append", default=[], help="an AppStore to ask for the bundle")
    dm.add_argument("--usb-path", action="append", default=[], help="where USB sticks are mounted (glob)")
    dm.set_defaults(func=cmd_device_make)

    owner = sub.add_parser("owner", help="the owner's signing identity").add_subparsers(dest="action", required=True)
    oi = owner.add_parser("init", help="make the owner's key and certificate (once)")
    oi.add_argument("--dir", required=True, help="folder for owner.key and owner.pem")
    oi.add_argument("--name", required=True, help="the owner's name, e.g. 'Coal Group Ops'")
    oi.set_defaults(func=cmd_owner_init)

    v = sub.add_parser("voucher", help="the maker signs that a box belongs to an owner")
    v.add_argument("serial")
    v.add_argument("--maker", required=True, help="the maker CA's folder")
    v.add_argument("--owner", required=True, help="the owner's certificate (owner.pem)")
    v.add_argument("--days", type=float, default=365.0, help="how long the voucher is valid (default 365)")
    v.add_argument("--out", help="where to write it (default SERIAL.voucher.json)")
    v.set_defaults(func=cmd_voucher)

    site = sub.add_parser("site", help="the owner's site configuration").add_subparsers(dest="action", required=True)
    sm = site.add_parser("make", help="sign site.toml into a provisioning bundle")
    sm.add_argument("site", help="the site description (site.toml)")
    sm.add_argument("--owner", required=True, help="the owner identity's folder")
    sm.add_argument("--voucher", required=True, help="the box's ownership voucher from the maker")
    sm.add_argument("--out", help="write OUT/appliance/SERIAL/provisioning.json (for a USB stick)")
    sm.add_argument("--register", metavar="URL", help=f"register it with this AppStore (token in {TOKEN_ENV})")
    sm.set_defaults(func=cmd_site_make)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except (ProvisioningError, CertificateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
