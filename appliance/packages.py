"""Installing model and app packages: check everything first, then change state atomically.

A model package is a folder holding ``model.onnx`` and ``model.json`` (the card). The card is
checked against the ONNX graph (input names, ranks, dtypes, fixed sizes, output names) and refused
with a message naming the disagreement. Files are copied into a content-addressed folder
(``models/<sha256>/``) under a temporary name and renamed into place, so a crash leaves the old state
or the new one, never half of one. The sha256 is recorded and checked again at every load.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from appliance.auth.accounts import Actor
from appliance.errors import InstallError
from appliance.runtime.deploy import admit_app
from appliance.runtime.partitions import PartitionPlan
from appliance.runtime.placement import AdmissionError
from appliance.store import AppRecord, ModelRecord, Store, StoreError
from common.files import fsync_dir
from formats import AppManifest, FormatError, ModelCard
from formats.graph import card_problems
from formats.model_card import package_files

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
CLI = Actor("cli", "local")  # who installs when no one else is named: the command line on the box

def _package_files(path: Path) -> tuple[Path, Path]:
    try:
        return package_files(path)
    except FormatError as e:
        raise InstallError(str(e)) from e


def _audited_refusal(action: str) -> Callable[[F], F]:
    """Write a refused install to the audit log (who, what, why) before the error reaches the user."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(store: Store, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(store, *args, **kwargs)
            except InstallError as e:
                package = args[1] if action == "model.install" else args[0]  # (models_dir, package) or (path, ...)
                by: Actor = kwargs.get("by") or CLI
                store.audit_log.add(by.name, f"{action}.refused", {"package": str(package), "reason": str(e)},
                                    by.address)
                raise

        return cast(F, inner)

    return wrap


@_audited_refusal("model.install")
def install_model(store: Store, models_dir: Path, package: Path, *, by: Actor = CLI) -> ModelRecord:
    """Check and install a model package; nothing changes unless every check passes."""
    onnx_path, card_path = _package_files(package)
    try:
        card = ModelCard.load(card_path)
    except FormatError as e:
        raise InstallError(f"model card refused:\n{e}") from e
    data = onnx_path.read_bytes()
    try:
        problems = card_problems(card, data, str(onnx_path))
    except FormatError as e:
        raise InstallError(str(e)) from e
    if problems:
        raise InstallError(f"{card_path} disagrees with {onnx_path.name}:\n  " + "\n  ".join(problems))
    if store.models.get(card.name, card.version) is not None:
        raise InstallError(f"model {card.key} is already installed; remove it first "
                           f"(appliance models remove {card.name} {card.version}) or give the new one another version")
    digest = hashlib.sha256(data).hexdigest()
    final = models_dir / digest
    if not final.exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        clean_staging(models_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=models_dir))
        try:
            (tmp / "model.onnx").write_bytes(data)
            (tmp / "model.json").write_text(card.to_json(), encoding="utf-8")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            os.rename(tmp, final)  # a folder: all of the package appears at once, under its content's name
            fsync_dir(models_dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists():
                raise InstallError(f"cannot write {final}: {e.strerror}") from e
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        store.models.add(card.to_json(), card.name, card.version, card.task, digest, len(data),
                         str(final / "model.onnx"))
    except StoreError as e:
        raise InstallError(str(e)) from e
    store.audit_log.add(by.name, "model.install", {"model": card.key, "sha256": digest}, by.address)
    record = store.models.get(card.name, card.version)
    assert record is not None
    return record


STAGING_PREFIX = ".install-"  # models/.install-{pid}-{random}: a model being written, renamed into place when whole
STAGING_ORPHAN_S = 3600.0  # seconds: a staging folder older than this is never a live install's


def clean_staging(models_dir: Path) -> int:
    """Remove staging folders that no running install owns (an ``appliance models add`` or a sync killed
    mid-write); the bytes freed. Folders of live installs (their process still runs) are left alone."""
    freed = 0
    for folder in models_dir.glob(f"{STAGING_PREFIX}*"):
        if not folder.is_dir() or _staging_owner_alive(folder):
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            freed += size
            log.info("removed %s (%.1f MB) left by an install that did not finish", folder, size / 2**20)
    return freed


def _staging_owner_alive(folder: Path) -> bool:
    """True while the install that made ``folder`` may still be writing it: its process runs (the pid is in
    the name) and it is younger than an install ever takes (a pid may be reused after a restart)."""
    try:
        if time.time() - folder.stat().st_mtime >= STAGING_ORPHAN_S:
            return False
    except OSError:
        return False
    pid_text = folder.name[len(STAGING_PREFIX):].split("-", 1)[0]
    if not pid_text.isdigit():
        return True  # an older name, without its owner: only its age tells
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_model(store: Store, name: str, version: str) -> ModelRecord:
    try:
        record = store.models.remove(name, version)
    except StoreError as e:
        raise InstallError(str(e)) from e
    if not any(m.sha256 == record.sha256 for m in store.models.all()):
        shutil.rmtree(Path(record.path).parent, ignore_errors=True)
    store.audit_log.add(CLI.name, "model.remove", {"model": f"{name}@{version}"}, CLI.address)
    return record


@_audited_refusal("app.install")
def install_app(store: Store, path: Path, plans: list[PartitionPlan] | None = None,
                pins: Mapping[str, str] | None = None, *, by: Actor = CLI) -> AppRecord:
    """Check and install (or upgrade) an app; with ``plans``, refuse it unless it fits in the partitions."""
    manifest_path = path / "app.json" if path.is_dir() else path
    try:
        manifest = AppManifest.load(manifest_path)
    except FormatError as e:
        raise InstallError(f"app manifest refused:\n{e}") from e
    return _install_manifest(store, manifest, plans, pins or {}, by.name, by.address)


def rollback_app(store: Store, name: str, actor: str = "cli", address: str | None = None) -> AppRecord:
    """Reinstall the manifest the app had before its last upgrade (the daemon swaps to it without a gap).

    ``actor`` and ``address`` say who asked, from where, in the audit log."""
    current = store.apps.get(name)
    if current is None:
        raise InstallError(f"no app named {name!r} is installed (see: appliance apps list)")
    if current.previous_manifest_json is None:
        raise InstallError(f"app {name} has no previous version to roll back to")
    manifest = AppManifest.parse(current.previous_manifest_json.encode(), f"previous manifest of {name}")
    record = _install_manifest(store, manifest, None, {}, actor, address)
    store.audit_log.add(actor, "app.rollback", {"app": name, "from": current.version, "to": manifest.version}, address)
    return record


def _install_manifest(store: Store, manifest: AppManifest, plans: list[PartitionPlan] | None,
                      pins: Mapping[str, str], actor: str = "cli", address: str | None = None) -> AppRecord:
    model = store.models.get(manifest.model.name, manifest.model.version)
    if model is None:
        raise InstallError(f"app {manifest.key} needs model {manifest.model.key}, which is not installed; "
                           f"install it first with: appliance models add <folder with model.onnx and model.json>")
    card = ModelCard.parse(model.card_json.encode(), model.name)
    wants = "camera" if card.input.kind == "image" else "sensor"
    if manifest.source_kind != wants:
        raise InstallError(f"app {manifest.key}: model {manifest.model.key} takes {card.input.kind} input, "
                           f"so the app's sources must be {wants} topics, not {manifest.sources[0]!r}")
    unknown = {lbl for r in manifest.rules for lbl in r.labels} - set(card.labels) - (
        {"anomaly"} if card.task == "anomaly" else {"value"} if card.task == "regression" else set())
    if unknown:
        raise InstallError(f"app {manifest.key}: rules name labels the model does not have: {', '.join(sorted(unknown))} "
                           f"(model labels: {', '.join(card.labels) or 'anomaly'})")
    if plans is not None:
        try:
            admit_app(manifest, store.apps.all(), store.models.all(), plans, pins)
        except AdmissionError as e:
            raise InstallError(str(e)) from e
    try:
        store.apps.add(manifest.to_json(), manifest.name, manifest.version, manifest.model.name, manifest.model.version)
    except StoreError as e:
        raise InstallError(str(e)) from e
    store.audit_log.add(actor, "app.install", {"app": manifest.key}, address)
    record = store.apps.get(manifest.name)
    assert record is not None
    return record
