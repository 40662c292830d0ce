"""Signing keys in ``DIR/keys``: one JSON file per key, mode 0600, generated with securesystemslib.

Each file holds the public key as TUF writes it into ``root.json`` and the private key as PKCS#8 PEM::

    {"role": "targets", "keyid": "9c1f...", "public": {"keytype": "ed25519", ...}, "private": "-----BEGIN..."}

The targets, snapshot and timestamp keys are online (the publisher and the server sign with them); the
root keys are needed only to create or rotate root and belong offline once ``keys init`` has run.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Root

from appstore.errors import RepoError
from appstore.layout import Layout
from common.files import write_atomically

ONLINE_ROLES = ("targets", "snapshot", "timestamp")


def generate() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def save(path: Path, role: str, signer: CryptoSigner) -> None:
    key = signer.public_key
    doc = {"role": role, "keyid": key.keyid, "public": key.to_dict(), "private": signer.private_bytes.decode()}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600)


def load(path: Path) -> CryptoSigner:
    try:
        doc = json.loads(path.read_bytes())
        public = SSlibKey.from_dict(doc["keyid"], dict(doc["public"]))
        private = load_pem_private_key(doc["private"].encode(), None)
        return CryptoSigner(private, public)
    except FileNotFoundError as e:
        raise RepoError(f"{path} is missing: put the key file back into {path.parent} to sign") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RepoError(f"{path}: not a key file written by `appstore keys init` ({e})") from e


def online_signer(layout: Layout, role: str, root: Root) -> CryptoSigner:
    """The signer of an online role, checked against what ``root`` trusts for it."""
    path = layout.keys / f"{role}.json"
    signer = load(path)
    if signer.public_key.keyid not in root.roles[role].keyids:
        raise RepoError(f"{path} holds key {signer.public_key.keyid[:12]}, which root does not trust for {role}; "
                        "restore the right key file")
    return signer
