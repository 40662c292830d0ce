"""The appliance's view of the AppStore: a verified catalog, channel documents and downloads, through TUF.

Every call makes a fresh ``tuf.ngclient.Updater`` bootstrapped with the trusted root from provisioning
(settings until provisioning exists) and refreshes it: TUF walks the root chain, and checks timestamp,
snapshot and targets for signatures by trusted keys, expiry, version rollback and consistency. Only then
is anything read or downloaded; a target's bytes are checked against its signed length and hashes.
TUF's errors are translated here, once, into :class:`~appstore_client.errors.CatalogError` with a reason a
person can act on.

    store = AppStore("https://store.example/", root_bytes, cache_dir, fetcher)
    catalog = store.refresh()
    channel = store.channel("stable")
    store.download("apps/ppe-watch/1.1.0/app.json", dest)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tuf.api import exceptions
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from appstore_client.errors import CatalogError
from formats.channel import ChannelDoc
from formats.errors import FormatError

log = logging.getLogger(__name__)

MAX_CHANNEL_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One published model or app, as its signed target metadata describes it."""

    kind: Literal["model", "app"]
    name: str
    version: str
    path: str
    description: str = ""
    labels: tuple[str, ...] = ()
    size: int = 0
    model: str = ""  # apps: name@version of the model they need


@dataclass(slots=True)
class Catalog:
    version: int  # of the signed targets metadata
    entries: list[CatalogEntry] = field(default_factory=list)

    def apps(self) -> dict[str, list[CatalogEntry]]:
        """Each app's published versions, oldest first (by the order of version numbers)."""
        out: dict[str, list[CatalogEntry]] = {}
        for e in self.entries:
            if e.kind == "app":
                out.setdefault(e.name, []).append(e)
        for versions in out.values():
            versions.sort(key=lambda e: version_key(e.version))
        return out

    def latest(self, app: str) -> CatalogEntry | None:
        versions = self.apps().get(app)
        return versions[-1] if versions else None

    def find(self, kind: str, name: str, version: str) -> CatalogEntry | None:
        return next((e for e in self.entries if (e.kind, e.name, e.version) == (kind, name, version)), None)


def version_key(version: str) -> tuple[tuple[int, str], ...]:
    """Sorts 1.10.0 after 1.9.0, and 1.0.0 after 1.0.0-rc1 well enough for a catalog."""
    parts = []
    for p in version.replace("-", ".").split("."):
        parts.append((int(p), "") if p.isdigit() else (-1, p))
    return tuple(parts)


def _translate(e: Exception, what: str) -> CatalogError:
    if isinstance(e, exceptions.ExpiredMetadataError):
        return CatalogError("expired", f"{what}: the AppStore's signed metadata has expired ({e}); the AppStore "
                                       "must refresh its timestamp (appstore timestamp refresh)")
    if isinstance(e, exceptions.BadVersionNumberError):
        return CatalogError("rollback", f"{what}: refused older metadata than already trusted ({e}): a replay or "
                                        "a rolled-back AppStore; nothing changes until it serves newer metadata")
    if isinstance(e, exceptions.UnsignedMetadataError):
        return CatalogError("untrusted", f"{what}: metadata not signed by the keys this appliance trusts ({e}); "
                                         "check the AppStore address and the trusted root")
    if isinstance(e, (exceptions.LengthOrHashMismatchError, exceptions.DownloadLengthMismatchError)):
        return CatalogError("tampered", f"{what}: the bytes do not match their signed length or hashes ({e}); "
                                        "refused")
    if isinstance(e, exceptions.RepositoryError):
        return CatalogError("invalid", f"{what}: the AppStore's metadata does not verify ({type(e).__name__}: {e})")
    if isinstance(e, exceptions.DownloadError):  # the fetcher's message says what failed (appstore_client.connection)
        return CatalogError("offline", f"{what}: {e}")
    return CatalogError("invalid", f"{what}: {type(e).__name__}: {e}")


class AppStore:
    def __init__(self, url: str, root: bytes, cache_dir: Path, fetcher: FetcherInterface) -> None:
        self.url = url.rstrip("/") + "/"
        self._root = root
        self._metadata_dir = cache_dir / "metadata"
        self._metadata_dir.mkdir(parents=True, exist_ok=True)
        self._fetcher = fetcher
        self._updater: Updater | None = None

    def _fresh(self) -> Updater:
        updater = Updater(str(self._metadata_dir), f"{self.url}metadata/", None, f"{self.url}targets/",
                          fetcher=self._fetcher, bootstrap=self._root)
        updater.refresh()
        return updater

    def refresh(self) -> Catalog:
        """Fetch and verify the newest metadata; the catalog it signs."""
        try:
            self._updater = self._fresh()
            # the Updater has verified and persisted this file; it is the current trusted targets role
            targets = Metadata[Targets].from_file(str(self._metadata_dir / "targets.json"))
        except Exception as e:
            self._updater = None
            raise _translate(e, f"refreshing from {self.url}") from e
        catalog = Catalog(targets.signed.version)
        for path, target in targets.signed.targets.items():
            entry = _entry(path, target.length, dict(target.unrecognized_fields.get("custom", {}) or {}))
            if entry is not None:
                catalog.entries.append(entry)
        return catalog

    def _need_updater(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater

    def download(self, path: str, dest: Path) -> Path:
        """Download one target into ``dest``, verified against its signed length and hashes; a ``dest`` that
        already holds exactly those bytes is kept as it is (no request)."""
        updater = self._need_updater()
        try:
            info = updater.get_targetinfo(path)
            if info is None:
                raise CatalogError("not_published", f"{path} is not published in the AppStore")
            if dest.is_file() and updater.find_cached_target(info, str(dest)):
                return dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            updater.download_target(info, str(dest))
        except CatalogError:
            raise
        except Exception as e:
            dest.unlink(missing_ok=True)
            raise _translate(e, f"downloading {path}") from e
        return dest

    def channel(self, name: str) -> ChannelDoc:
        """The channel's signed desired state (see docs/appstore.md)."""
        # kept between refreshes: an unchanged channel costs no request
        data = self.download(f"channels/{name}.json", self._metadata_dir.parent / "channels" / f"{name}.json").read_bytes()
        if len(data) > MAX_CHANNEL_BYTES:
            raise CatalogError("invalid", f"channel {name} is {len(data)} bytes: too large")
        try:
            return ChannelDoc.parse(data, f"channel {name}")
        except FormatError as e:
            raise CatalogError("invalid", f"channel {name} was published wrong: {e}") from e


def _entry(path: str, length: int, custom: dict[str, Any]) -> CatalogEntry | None:
    kind = custom.get("kind")
    if kind not in ("model", "app"):
        return None
    labels = custom.get("labels") or ()
    return CatalogEntry(kind=kind, name=str(custom.get("name", "")), version=str(custom.get("version", "")),
                        path=path, description=str(custom.get("description", "")),
                        labels=tuple(str(x) for x in labels) if isinstance(labels, (list, tuple)) else (),
                        size=int(custom.get("size") or length), model=str(custom.get("model", "")))
