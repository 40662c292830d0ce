"""Build an appliance release from a source tree: ``dist/release-{version}/`` with release.json and its wheels.

    python -m image.bundle                      # the tree as it is (make bundle)
    python -m image.bundle --version 0.2.0      # the tree with its version set to 0.2.0 (in a copy)
    appstore publish release dist/release-0.2.0

The appliance's own wheel is built from the tree (``pip wheel --no-deps``); every dependency is the wheel
of exactly the version installed in the environment that builds, and therefore tested, the release:
its dependency closure is read from the installed metadata and each wheel is taken from the wheelhouse
(``.cache/wheelhouse``) or downloaded into it by pip. Two releases built from the same environment share
every dependency wheel byte for byte, so a box that has one release downloads only the appliance wheel
of the next. The release is for the building machine's Python and platform, which the manifest records;
a box with another refuses it before downloading anything.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from formats.release import APPLIANCE_DISTRIBUTION, ReleaseFile, ReleaseManifest, file_entry

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
SKIP = {".git", ".venv", ".cache", "dist", "build", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache",
        ".appliance", ".hypothesis", "appstore-repo", "demo-models", "screenshots"}


class BundleError(Exception):
    """The release could not be built; the message says why."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def copy_tree(source: Path, dest: Path) -> Path:
    """A copy of the source tree without build outputs, caches and state (tests change it to make releases)."""
    shutil.copytree(source, dest, ignore=lambda _d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    return dest


def set_version(tree: Path, version: str) -> None:
    pyproject = tree / "pyproject.toml"
    text, n = re.subn(r'(?m)^version = "[^"]*"$', f'version = "{version}"', pyproject.read_text(), count=1)
    if n != 1:
        raise BundleError(f"{pyproject}: no `version = \"...\"` line to set")
    pyproject.write_text(text)


def closure(roots: Iterable[str]) -> dict[str, str]:
    """Distribution name -> installed version, for ``roots`` and everything they need (markers evaluated)."""
    found: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    pending = [r for r in map(Requirement, roots) if r.marker is None or r.marker.evaluate({"extra": ""})]
    while pending:
        req = pending.pop()
        key = (_norm(req.name), frozenset(req.extras))
        if key in visited:
            continue
        visited.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError as e:
            raise BundleError(f"{req.name} is required but not installed in {sys.prefix}; run `make test` (or "
                              "pip install -e .) first so the release holds what was tested") from e
        found[key[0]] = dist.version
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                pending.append(sub)
    return found


def _wheel_for(house: Path, name: str, version: str) -> Path | None:
    for path in house.glob("*.whl"):
        dist, ver = path.name.split("-")[:2]
        if _norm(dist) == name and ver == version:
            return path
    return None


def dependency_wheels(pyproject: Path, house: Path = WHEELHOUSE, gpu: bool = False) -> list[Path]:
    """The wheel of every runtime dependency of the project, at the installed version; with ``gpu``, also the
    CUDA and cuDNN runtime wheels the ``gpu`` extra asks for (see :func:`gpu_pins`)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    pins = closure(project["dependencies"])
    house.mkdir(parents=True, exist_ok=True)
    with open(house / ".lock", "w") as lock:  # another build (a parallel test worker) may be filling it
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [f"{n}=={v}" for n, v in sorted(pins.items()) if _wheel_for(house, n, v) is None]
        if missing:
            print(f"fetching {len(missing)} dependency wheels into {house}", file=sys.stderr)
            _pip(["wheel", "--no-deps", "--wheel-dir", str(house), *missing], "fetching the dependency wheels")
        if gpu:
            pins.update(gpu_pins(project.get("optional-dependencies", {}).get("gpu", []), pins, house))
    wheels = []
    for n, v in sorted(pins.items()):
        w = _wheel_for(house, n, v)
        if w is None:
            raise BundleError(f"no wheel of {n} {v} in {house} after pip wheel")
        wheels.append(w)
    return wheels


def gpu_pins(roots: Sequence[str], pins: dict[str, str], house: Path) -> dict[str, str]:
    """The wheels the ``gpu`` extra adds (CUDA and cuDNN runtimes), fetched into ``house``.

    A machine with no GPU cannot install and test them, so they are not taken from the environment like the
    others: pip resolves the extra with every other distribution held at the version the CPU release pins
    (onnxruntime-gpu included), which leaves only the NVIDIA runtime wheels its own extras name to choose."""
    if not roots:
        raise BundleError("pyproject.toml has no `gpu` optional dependencies to build the GPU release from")
    with tempfile.TemporaryDirectory(prefix="gpu-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
        fetched = Path(tmp) / "wheels"
        _pip(["download", "--only-binary=:all:", "--dest", str(fetched), "--constraint", str(constraints), *roots],
             "fetching the GPU runtime wheels")
        added: dict[str, str] = {}
        for wheel in sorted(fetched.glob("*.whl")):
            name, version = wheel.name.split("-")[:2]
            if _norm(name) not in pins:
                added[_norm(name)] = version
                if _wheel_for(house, _norm(name), version) is None:
                    shutil.move(str(wheel), house / wheel.name)
    return added


def _pip(args: Sequence[str], what: str, cwd: Path | None = None) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                       text=True, cwd=cwd, check=False)
    if r.returncode != 0:
        raise BundleError(f"{what} failed: {(r.stderr or r.stdout).strip()[-2000:]}")


def appliance_wheel(tree: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    _pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest), str(tree)],
         f"building the appliance wheel from {tree}")
    [wheel] = dest.glob(f"{_norm(APPLIANCE_DISTRIBUTION)}-*.whl")
    return wheel


_ENTRIES: dict[tuple[str, int, int], ReleaseFile] = {}  # wheelhouse files hashed in this process


def _entry(wheel: Path) -> ReleaseFile:
    st = wheel.stat()
    key = (str(wheel), st.st_size, st.st_mtime_ns)
    if key not in _ENTRIES:
        _ENTRIES[key] = file_entry(wheel)
    return _ENTRIES[key]


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _schema_version(tree: Path) -> int:
    r = subprocess.run([sys.executable, "-c", "from appliance.store.migrations import SCHEMA_VERSION as v; print(v)"],
                       capture_output=True, text=True, cwd=tree, check=False)
    if r.returncode != 0:
        raise BundleError(f"cannot read the schema version of {tree}: {r.stderr.strip()[-500:]}")
    return int(r.stdout.strip())


def build(out: Path, source: Path = ROOT, version: str | None = None, min_from: str = "0.1.0",
          house: Path = WHEELHOUSE, gpu: bool = False) -> Path:
    """Build the release of ``source`` (its version set to ``version`` in a copy) into ``out/release-V``."""
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        tree = copy_tree(source, Path(tmp) / "src")  # a clean copy: no build/ left over from an earlier build
        if version is not None:
            set_version(tree, version)
        own = appliance_wheel(tree, Path(tmp) / "wheel")
        found = own.name.split("-")[1]
        folder = out / f"release-{found}{'-gpu' if gpu else ''}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copy2(own, folder / own.name)
        wheels = [own, *dependency_wheels(tree / "pyproject.toml", house, gpu)]
        for w in wheels[1:]:
            _link_or_copy(w, folder / w.name)  # the wheelhouse's files are never changed in place
        files = tuple(_entry(w) for w in wheels)
        manifest = ReleaseManifest(version=found, python=f"{sys.version_info.major}.{sys.version_info.minor}",
                                   platform=sysconfig.get_platform(), min_from=min_from,
                                   db_schema=_schema_version(tree), files=files, created=time.time())
        manifest.check(str(folder))
        (folder / "release.json").write_text(manifest.to_json())
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m image.bundle", description="Build an appliance release (release.json "
                                "and every wheel) from this tree, for `appstore publish release`.")
    p.add_argument("--out", default=str(ROOT / "dist"), help="where release-VERSION/ is written (default dist/)")
    p.add_argument("--version", help="build the tree with this version (default: pyproject.toml's)")
    p.add_argument("--min-from", default="0.1.0", help="the oldest appliance version that may upgrade to it")
    p.add_argument("--wheelhouse", default=str(WHEELHOUSE), help="dependency wheels kept between builds")
    p.add_argument("--gpu", action="store_true", help="also the CUDA and cuDNN runtime wheels (release-VERSION-gpu/)")
    args = p.parse_args(argv)
    try:
        folder = build(Path(args.out), version=args.version, min_from=args.min_from, house=Path(args.wheelhouse),
                       gpu=args.gpu)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = ReleaseManifest.load(folder / "release.json")
    print(f"built appliance {m.version} in {folder}: {len(m.files)} wheels, {m.size / 1e6:.0f} MB "
          f"(Python {m.python}, {m.platform}, schema {m.db_schema}); publish it with: "
          f"appstore publish release {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
