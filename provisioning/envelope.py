"""Signed documents as DSSE envelopes (securesystemslib's): one signature by an ECDSA P-256 key, verified
against the certificate of the party that must have signed, for one payload type."""

from __future__ import annotations

import json
from typing import TypeVar

from cryptography import x509
from pydantic import BaseModel
from securesystemslib.dsse import Envelope as Dsse
from securesystemslib.exceptions import FormatError as SslibFormatError
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from formats.errors import FormatError, parse_json_document
from formats.provisioning import Envelope
from pki.certs import Identity
from provisioning.errors import Refused

M = TypeVar("M", bound=BaseModel)


def sign(document: BaseModel, payload_type: str, signer: Identity) -> Envelope:
    payload = document.model_dump_json(by_alias=True).encode()
    envelope = Dsse(payload, payload_type, {})
    envelope.sign(CryptoSigner(signer.key))
    return Envelope.model_validate(envelope.to_dict())


def open_signed(envelope: Envelope, payload_type: str, model: type[M], signer: x509.Certificate, step: str,
                who: str) -> M:
    """The document inside ``envelope`` if ``signer``'s key signed it; :class:`Refused` at ``step`` if not."""
    if envelope.payload_type != payload_type:
        raise Refused(step, f"the envelope holds {envelope.payload_type!r}, not {payload_type!r}")
    try:
        dsse = Dsse.from_dict(json.loads(envelope.model_dump_json(by_alias=True)))
        dsse.verify([SSlibKey.from_crypto(signer.public_key())], 1)
    except (VerificationError, SslibFormatError, KeyError, ValueError) as e:
        raise Refused(step, f"not signed by {who}, or altered after signing ({e})") from e
    try:
        return parse_json_document(model, dsse.payload, step)
    except FormatError as e:
        raise Refused(step, str(e)) from e
