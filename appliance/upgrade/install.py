"""Make a release into an environment on the box, offline: ``releases/{version}`` from the wheels it names.

The wheels are kept once each under ``wheels/{sha256}/{name}`` (what a later release shares with this one
is never downloaded again), and the environment is made by uv with no index and no network, from exactly
the files the signed manifest lists (``--no-deps``: nothing is resolved on the box). uv hard-links the
installed files from its cache, so a second release costs little more disk than the files that changed.
A release folder counts only once its ``.installed`` marker is written, last; a half-made one (power cut,
SIGKILL) is removed and made again::

    files = store_wheels(layout, manifest, folder)   # or downloaded into layout.wheels by the agent
    install_release(layout, manifest, python=Path(sys.executable), cache_dir=layout.root / "cache" / "uv")
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from appliance.upgrade.errors import InstallFailed
from appliance_launcher.state import Layout
from appstore_client.client import version_key
from common import crashpoint
from common.files import write_atomically
from formats.errors import FormatError
from formats.release import ReleaseFile, ReleaseManifest, matches

log = logging.getLogger(__name__)

INSTALL_TIMEOUT_S = 600.0  # seconds uv may take to make one environment


def wheel_path(layout: Layout, f: ReleaseFile) -> Path:
    return layout.wheels / f.sha256 / f.name


def has_wheel(layout: Layout, f: ReleaseFile) -> bool:
    """Whether the box holds this exact wheel (its length is checked here; its hash when it was stored)."""
    path = wheel_path(layout, f)
    return path.is_file() and path.stat().st_size == f.length


def base_python() -> Path:
    """The interpreter the running release was made from: new releases run on it too."""
    return Path(getattr(sys, "_base_executable", sys.executable))


def check_box(manifest: ReleaseManifest, python: Path) -> None:
    """Refuse a release built for another Python or platform before anything is downloaded."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python == base_python() and manifest.python != here:
        raise InstallFailed(f"release {manifest.version} is built for Python {manifest.python}; this box runs "
                            f"{here}: publish a release built for Python {here}")
    if manifest.platform != sysconfig.get_platform():
        raise InstallFailed(f"release {manifest.version} is built for {manifest.platform}; this box is "
                            f"{sysconfig.get_platform()}: publish a release built for it")


def store_wheels(layout: Layout, manifest: ReleaseManifest, folder: Path) -> None:
    """Put the wheels of a release folder (``make bundle``'s) into the box's wheel store, checked against the
    manifest; hard links where the file system allows, copies elsewhere."""
    for f in manifest.files:
        if has_wheel(layout, f):
            continue
        source = folder / f.name
        if not matches(source, f):
            raise InstallFailed(f"{source} is missing or does not match {folder / 'release.json'}; build the "
                                "release again with `make bundle`")
        dest = wheel_path(layout, f)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{f.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, dest)


def _uv() -> str:
    try:
        from uv import find_uv_bin
    except ImportError as e:  # pragma: no cover - uv is a dependency of the appliance
        raise InstallFailed("uv is not installed in this release; it is needed to make new releases") from e
    return str(find_uv_bin())


def _run(args: list[str], cache_dir: Path, what: str) -> None:
    env = dict(os.environ, UV_CACHE_DIR=str(cache_dir), UV_PYTHON_DOWNLOADS="never", UV_NO_CONFIG="1",
               UV_OFFLINE="1")
    env.pop("VIRTUAL_ENV", None)
    try:
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InstallFailed(f"{what}: {e}") from e
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise InstallFailed(f"{what} failed (uv exit {r.returncode}): {' | '.join(tail)}")


def install_release(layout: Layout, manifest: ReleaseManifest, python: Path, cache_dir: Path) -> Path:
    """Make ``releases/{version}`` from the stored wheels; returns its folder (kept as it is if whole)."""
    folder = layout.release(manifest.version)
    if layout.installed(manifest.version):
        return folder
    missing = [f.name for f in manifest.files if not has_wheel(layout, f)]
    if missing:
        raise InstallFailed(f"release {manifest.version}: {len(missing)} wheels are not on the box "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    shutil.rmtree(folder, ignore_errors=True)  # a half-made one from a crash
    layout.releases.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    uv = _uv()
    log.info("making release %s in %s (%d wheels)", manifest.version, folder, len(manifest.files))
    try:
        _run([uv, "venv", "--quiet", "--python", str(python), str(folder)], cache_dir,
             f"making the environment of {manifest.version} with {python}")
        _run([uv, "pip", "install", "--quiet", "--python", str(folder / "bin" / "python"), "--no-index", "--no-deps",
              "--link-mode", "hardlink", *(str(wheel_path(layout, f)) for f in manifest.files)], cache_dir,
             f"installing the wheels of {manifest.version}")
        crashpoint.reached("upgrade.install")  # the crash tests: killed with a half-made release on disk
        if not (folder / "bin" / "appliance").is_file():
            raise InstallFailed(f"release {manifest.version} has no bin/appliance after install: its "
                                f"{manifest.appliance_wheel.name} is not an appliance wheel")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    write_atomically(folder / "release.json", manifest.to_json().encode())
    write_atomically(folder / ".installed", b"")  # last: the release is whole
    return folder


def release_manifest(layout: Layout, version: str) -> ReleaseManifest | None:
    """The manifest an installed release was made from (None for a release made otherwise)."""
    path = layout.release(version) / "release.json"
    try:
        return ReleaseManifest.load(path) if path.is_file() else None
    except FormatError:
        return None


def prune(layout: Layout, keep: set[str], keep_count: int) -> list[str]:
    """Remove releases beyond ``keep_count`` (never those in ``keep``: current, previous, on trial) and the
    wheels no kept release names; returns the versions removed."""
    versions = sorted(layout.installed_versions(), key=version_key)
    extra = [v for v in versions if v not in keep]
    removed = extra[:max(0, len(versions) - keep_count)]
    for v in removed:
        shutil.rmtree(layout.release(v), ignore_errors=True)
    needed = {f.sha256 for v in layout.installed_versions() if (m := release_manifest(layout, v)) for f in m.files}
    if layout.wheels.is_dir() and needed:
        for d in layout.wheels.iterdir():
            if d.name not in needed:
                shutil.rmtree(d, ignore_errors=True)
    return removed


def install_bundle(layout: Layout, folder: Path, python: Path | None = None, cache_dir: Path | None = None) -> str:
    """Install a release folder as the box's first release (the image, a lab box, the tests) and point
    ``current`` at it if nothing is current yet; returns its version."""
    try:
        manifest = ReleaseManifest.load(folder / "release.json")
    except FormatError as e:
        raise InstallFailed(str(e)) from e
    python = python or base_python()
    check_box(manifest, python)
    store_wheels(layout, manifest, folder)
    install_release(layout, manifest, python, cache_dir or layout.root / "cache" / "uv")
    if layout.target(layout.current) is None:
        layout.point(layout.current, manifest.version)
    return manifest.version


def register_environment(layout: Layout, version: str, environment: Path) -> None:
    """Make an existing environment (a development checkout's venv) the release ``version`` and ``current``,
    so that it runs under the launcher and can upgrade to real releases (``make demo``). It has no wheels:
    the first real release downloads them all. Any trial left from an earlier run is dropped."""
    folder = layout.release(version)
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)
    (folder / "bin").mkdir(parents=True)
    for name in ("appliance", "python"):
        os.symlink(environment / "bin" / name, folder / "bin" / name)
    write_atomically(folder / ".installed", b"")
    state = layout.state()
    state.trial = None
    layout.save(state)
    layout.point(layout.current, version)
    layout.request_file.unlink(missing_ok=True)
