"""Publishing models, apps and appliance releases: validate with ``formats``, keep versions immutable, sign.

A version once published never changes: publishing the same name and version again with the same bytes
changes nothing, with different bytes it is refused. An app is refused until the model it names is
published, so an appliance never sees an app it cannot install.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appstore import paths
from appstore.errors import PublishError
from appstore.repository import Repository, TargetsEditor
from formats import AppManifest, FormatError, ModelCard
from formats.graph import card_problems
from formats.model_card import package_files
from formats.release import ReleaseManifest, release_manifest_target


@dataclass(frozen=True, slots=True)
class Published:
    kind: str  # "model", "app" or "release"
    name: str
    version: str
    targets: tuple[str, ...]
    unchanged: bool  # the same bytes were already published


def _check_graph(card: ModelCard, data: bytes, where: Path) -> None:
    """The graph must agree with its card exactly as an appliance checks it at install (formats.graph)."""
    try:
        problems = card_problems(card, data, str(where))
    except FormatError as e:
        raise PublishError(str(e)) from e
    if problems:
        raise PublishError(f"{where.parent / 'model.json'} disagrees with {where.name}: " + "; ".join(problems)
                           + "; fix model.json or export the model again")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put_immutable(edit: TargetsEditor, items: list[tuple[str, bytes, dict[str, Any]]]) -> bool:
    """Put each ``(path, bytes, custom)`` not yet published; refuse all if any path has other bytes.

    Returns True if anything was added. Everything is checked before anything is put, so a refusal leaves
    nothing half published.
    """
    for path, data, _ in items:
        existing = edit.get(path)
        if existing is not None and existing.hashes.get("sha256") != _sha256(data):
            raise PublishError(f"{path} is already published with different bytes (sha256 "
                               f"{existing.hashes.get('sha256', '?')[:12]}, yours {_sha256(data)[:12]}); "
                               "versions are immutable: give it a new version and publish that")
    added = False
    for path, data, custom in items:
        if edit.get(path) is None:
            edit.put(path, data, custom)
            added = True
    return added


def publish_model(repo: Repository, package: Path) -> Published:
    """Publish a model package: a folder holding ``model.onnx`` and ``model.json``."""
    try:
        onnx_path, card_path = package_files(package)
    except FormatError as e:
        raise PublishError(str(e)) from e
    card = ModelCard.load(card_path)
    data, card_bytes = onnx_path.read_bytes(), card_path.read_bytes()
    _check_graph(card, data, onnx_path)
    file_path, card_target = paths.model_file(card.name, card.version), paths.model_card(card.name, card.version)
    with repo.edit_targets() as edit:
        added = _put_immutable(edit, [
            (file_path, data, {"kind": "model-file"}),
            (card_target, card_bytes, {"kind": "model", "name": card.name, "version": card.version,
                                       "description": card.description, "labels": list(card.labels),
                                       "size": len(data)}),
        ])
    return Published("model", card.name, card.version, (file_path, card_target), not added)


def publish_app(repo: Repository, path: Path) -> Published:
    """Publish an app manifest (``app.json``, or a folder holding it); its model must be published already."""
    manifest_path = path / "app.json" if path.is_dir() else path
    if not manifest_path.is_file():
        raise PublishError(f"{path}: no such file; give the app's app.json")
    manifest = AppManifest.load(manifest_path)
    raw = manifest_path.read_bytes()
    target = paths.app_manifest(manifest.name, manifest.version)
    model = manifest.model
    with repo.edit_targets() as edit:
        if edit.get(paths.model_card(model.name, model.version)) is None:
            raise PublishError(f"app {manifest.name} {manifest.version} needs model {model.name} {model.version}, "
                               f"which is not published; publish it first with: appstore publish model <folder>")
        added = _put_immutable(edit, [(target, raw, {
            "kind": "app", "name": manifest.name, "version": manifest.version,
            "description": manifest.description, "model": model.key})])
    return Published("app", manifest.name, manifest.version, (target,), not added)


def publish_release(repo: Repository, folder: Path) -> Published:
    """Publish an appliance release built by ``make bundle``: a folder holding ``release.json`` and its wheels.

    Every wheel is checked against the manifest before anything is signed; each becomes its own
    content-addressed target, so a wheel already published by an earlier release costs nothing.
    """
    manifest_path = folder / "release.json"
    if not manifest_path.is_file():
        raise PublishError(f"{folder}: no release.json; give the folder `make bundle` wrote (dist/release-VERSION)")
    try:
        manifest = ReleaseManifest.load(manifest_path)
    except FormatError as e:
        raise PublishError(str(e)) from e
    items: list[tuple[str, bytes, dict[str, Any]]] = []
    published = repo.targets().signed.targets
    for f in manifest.files:
        if f.target in published:
            continue  # the path holds the sha256: those exact bytes are published (by an earlier release)
        wheel = folder / f.name
        try:
            data = wheel.read_bytes()
        except OSError as e:
            raise PublishError(f"{wheel}: cannot read ({e.strerror}); the release folder is incomplete, build it "
                               "again with `make bundle`") from e
        if len(data) != f.length or _sha256(data) != f.sha256:
            raise PublishError(f"{wheel} does not match release.json (length {len(data)}, sha256 "
                               f"{_sha256(data)[:12]}; the manifest says {f.length}, {f.sha256[:12]}); build the "
                               "release again")
        items.append((f.target, data, {"kind": "release-file", "name": f.name}))
    target = release_manifest_target(manifest.version)
    items.append((target, manifest_path.read_bytes(), {
        "kind": "release", "name": "appliance", "version": manifest.version, "size": manifest.size,
        "min_from": manifest.min_from, "python": manifest.python, "platform": manifest.platform}))
    with repo.edit_targets() as edit:
        added = _put_immutable(edit, items)
    return Published("release", "appliance", manifest.version, tuple(i[0] for i in items), not added)
