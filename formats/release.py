"""An appliance release (docs/upgrade.md): the manifest ``appliance/{version}/release.json`` and its files.

A release is the appliance's own wheel plus the wheel of every dependency, each published as its own
content-addressed target ``appliance/files/{sha256}/{name}``: a box that already holds a wheel (from the
release it runs) never downloads it again, so an upgrade that changes only the appliance's code costs
about one wheel. The manifest names every file with its length and hash, and says what the release
needs of the box (Python, platform) and of the box's past (the oldest version it may upgrade from, the
database schema it migrates to). The AppStore signs it like every other target; the appliance checks
each downloaded file against the manifest, and TUF checks both against the signed metadata.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from formats.errors import FormatError, load_json_document, parse_json_document
from formats.model_card import VERSION_PATTERN

WHEEL_PATTERN = r"^[A-Za-z0-9_.+-]+\.whl$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
APPLIANCE_DISTRIBUTION = "edge-appliance"  # the name of the appliance's own wheel, as pip spells it

Version = Annotated[str, Field(pattern=VERSION_PATTERN)]


class ReleaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=WHEEL_PATTERN)
    sha256: str = Field(pattern=SHA256_PATTERN)
    length: int = Field(gt=0)  # bytes

    @property
    def target(self) -> str:
        return release_file_target(self.sha256, self.name)


class ReleaseManifest(BaseModel):
    """``appliance/{version}/release.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_version: Literal[1] = Field(default=1, alias="schema")
    version: Version
    python: str = Field(pattern=r"^3\.[0-9]+$")  # major.minor of the interpreter the wheels are for
    platform: str = Field(min_length=1)  # sysconfig.get_platform() of the build, e.g. linux-x86_64
    min_from: Version  # the oldest appliance version that may upgrade to this one
    db_schema: int = Field(ge=1)  # the database schema version this release migrates to
    files: tuple[ReleaseFile, ...] = Field(min_length=1)
    created: float = 0.0  # epoch seconds

    @property
    def appliance_wheel(self) -> ReleaseFile:
        prefix = APPLIANCE_DISTRIBUTION.replace("-", "_") + "-"
        return next(f for f in self.files if f.name.startswith(prefix))

    @property
    def size(self) -> int:
        return sum(f.length for f in self.files)

    @classmethod
    def parse(cls, raw: bytes, where: str) -> ReleaseManifest:
        manifest = parse_json_document(cls, raw, where)
        manifest.check(where)
        return manifest

    @classmethod
    def load(cls, path: Path) -> ReleaseManifest:
        manifest = load_json_document(cls, path)
        manifest.check(str(path))
        return manifest

    def check(self, where: str) -> None:
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise FormatError(f"{where}: files: a wheel is named twice")
        prefix = APPLIANCE_DISTRIBUTION.replace("-", "_") + "-"
        own = [n for n in names if n.startswith(prefix)]
        if len(own) != 1 or not own[0].startswith(f"{prefix}{self.version}-"):
            raise FormatError(f"{where}: files must hold exactly one {APPLIANCE_DISTRIBUTION} wheel of version "
                              f"{self.version} (found {', '.join(own) or 'none'})")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"


def release_manifest_target(version: str) -> str:
    return f"appliance/{version}/release.json"


def release_file_target(sha256: str, name: str) -> str:
    return f"appliance/files/{sha256}/{name}"


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in chunks (the biggest wheels are hundreds of megabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> ReleaseFile:
    """The manifest entry of a wheel on disk."""
    return ReleaseFile(name=path.name, sha256=sha256_of(path), length=path.stat().st_size)


def matches(path: Path, f: ReleaseFile) -> bool:
    """Whether the file at ``path`` (under any name) holds exactly the bytes ``f`` names."""
    return path.is_file() and path.stat().st_size == f.length and sha256_of(path) == f.sha256
