"""The appliance OS image: ``make image`` (``python -m image.build [--out dist/image] [--gpu]``), as root.

1. The release bundle of this tree (:mod:`image.bundle`): the appliance's wheel and every runtime
   dependency's, the signed-release layout a self-upgrade downloads.
2. A Debian bookworm root file system by ``mmdebstrap`` (packages by name from Debian's archive: Python,
   systemd, Mosquitto, time sync), and in it, by customize hooks:
   - the user ``appliance`` (system, no login, home and state ``/var/lib/appliance``);
   - the launcher, standard library only, outside the releases: ``/usr/lib/appliance/launcher``;
   - the release, installed the way a self-upgrade installs one (:func:`appliance.upgrade.install.install_bundle`
     run inside the image with the image's own Python): ``/var/lib/appliance/wheels/{sha256}/``,
     ``releases/{version}`` (uv, no index, hard links), ``current``;
   - the factory's settings (``/var/lib/appliance/appliance.toml``: console on every address, embedded
     broker on loopback until the site's configuration says otherwise);
   - the units from ``image/units`` (enabled), journald's size limits, Mosquitto's own service masked (the
     daemon runs the managed broker itself, inside ``appliance.service``'s sandbox).
   With ``--gpu``: the CUDA and cuDNN runtime wheels in the release, ``nvidia-mps.service``, and a drop-in
   that gives ``appliance.service`` the NVIDIA devices and nothing else (the driver is the host's).
3. ``OUT/appliance-VERSION[-gpu]-rootfs.tar``: the root file system, state included. Everything that
   changes lives under ``/var/lib/appliance`` (database, models, snapshots, samples, releases), apart from
   the read-mostly system, so that a disk layout can give it a partition of its own (docs/image.md).

The factory identity (``provision device make``) is per box and is not in the image.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from image.bundle import ROOT
from image.bundle import build as build_bundle

PACKAGES = ["python3", "python3-venv", "systemd", "systemd-sysv", "systemd-timesyncd", "dbus", "mosquitto",
            "ca-certificates", "iproute2"]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
STATE = "/var/lib/appliance"
LAUNCHER = "/usr/lib/appliance/launcher"
UNITS = ROOT / "image" / "units"
FACTORY_SETTINGS = f"""\
# the factory's settings: `appliance provision` puts the site's over them (and keeps these in
# provisioning/factory-settings.toml)
state_dir = "{STATE}"
[http]
host = "0.0.0.0"
"""
JOURNALD = """\
# the appliance's logs stay on the box, within bounds a small disk keeps (docs/image.md)
[Journal]
Storage=persistent
SystemMaxUse=200M
SystemKeepFree=1G
MaxRetentionSec=30day
RateLimitIntervalSec=30s
RateLimitBurst=2000
"""
INSTALL = f"""\
set -eu
# the installer's own environment comes from a cache of its own, removed after: the release's cache is the one
# the next self-upgrade links from
export UV_CACHE_DIR=/tmp/uv-cache HOME=/root
uv=$(ls -d /tmp/bundle/uv-*.whl)
mkdir -p /tmp/uv && cd /tmp/uv && python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('.')" "$uv"
UV=$(ls /tmp/uv/uv-*.data/scripts/uv) && chmod +x "$UV"
"$UV" venv --quiet --python /usr/bin/python3 /tmp/installer
"$UV" pip install --quiet --python /tmp/installer/bin/python --no-index --no-deps --link-mode hardlink /tmp/bundle/*.whl
/tmp/installer/bin/python -c "
from pathlib import Path
from appliance.upgrade.install import install_bundle
from appliance_launcher.state import Layout
print(install_bundle(Layout(Path('{STATE}')), Path('/tmp/bundle'), python=Path('/usr/bin/python3'),
                     cache_dir=Path('{STATE}/cache/uv')))"
rm -rf /tmp/installer /tmp/uv /tmp/uv-cache /tmp/bundle
"""


class ImageError(Exception):
    pass


def customize(root: Path, bundle: Path, gpu: bool = False) -> None:
    """The customize hook: runs on the host with the new root file system at ``root``."""
    def chroot(*args: str) -> None:
        r = subprocess.run(["chroot", str(root), *args], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise ImageError(f"in the image, {' '.join(args)[:120]} failed ({r.returncode}): "
                             f"{(r.stderr or r.stdout).strip()[-2000:]}")
        if r.stdout.strip():
            print(r.stdout.strip(), flush=True)

    chroot("useradd", "--system", "--user-group", "--home-dir", STATE, "--no-create-home", "--shell",
           "/usr/sbin/nologin", "appliance")
    state = root / STATE.lstrip("/")
    state.mkdir(parents=True, exist_ok=True)
    launcher = root / LAUNCHER.lstrip("/")
    for package in ("appliance_launcher", "common"):
        shutil.copytree(ROOT / package, launcher / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(bundle, root / "tmp" / "bundle")
    (root / "tmp" / "install.sh").write_text(INSTALL)
    chroot("sh", "/tmp/install.sh")
    (root / "tmp" / "install.sh").unlink()
    (state / "appliance.toml").write_text(FACTORY_SETTINGS)
    system = root / "etc" / "systemd" / "system"
    for unit in sorted(UNITS.glob("*.service")):  # the GPU units are in units/gpu/
        shutil.copy(unit, system / unit.name)
    (root / "etc" / "systemd" / "journald.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "systemd" / "journald.conf.d" / "appliance.conf").write_text(JOURNALD)
    enabled = ["appliance-provision.service", "appliance.service", "systemd-timesyncd.service"]
    if gpu:
        shutil.copy(UNITS / "gpu" / "nvidia-mps.service", system / "nvidia-mps.service")
        (system / "appliance.service.d").mkdir(exist_ok=True)
        shutil.copy(UNITS / "gpu" / "appliance-gpu.conf", system / "appliance.service.d" / "gpu.conf")
        enabled.append("nvidia-mps.service")
    chroot("systemctl", "enable", *enabled)
    chroot("systemctl", "mask", "mosquitto.service")
    chroot("chown", "-R", "appliance:appliance", STATE)
    chroot("chmod", "0700", STATE)
    docs = root / "usr" / "share" / "doc" / "appliance"
    docs.mkdir(parents=True, exist_ok=True)
    for page in ("install.md", "image.md"):
        if (ROOT / "docs" / page).is_file():
            shutil.copy(ROOT / "docs" / page, docs / page)


def build(out: Path, gpu: bool = False) -> Path:
    if os.geteuid() != 0:
        raise ImageError("make image runs mmdebstrap and chroot, which need root: run it as root (sudo make image)")
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap is not installed: apt-get install mmdebstrap (tools/system-packages image)")
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(out, gpu=gpu)
    version = bundle.name.removeprefix("release-")  # "0.1.0", or "0.1.0-gpu"
    tarball = out / f"appliance-{version}-rootfs.tar"
    with tempfile.TemporaryDirectory(prefix="image-") as tmp:
        hook = Path(tmp) / "customize.sh"
        hook.write_text(f'#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m image.build --customize "$1" --bundle '
                        f'{bundle.resolve()}{" --gpu" if gpu else ""}\n')
        hook.chmod(0o755)
        cmd = ["mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", f"--customize-hook={hook} \"$1\"",
               SUITE, str(tarball), MIRROR]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise ImageError(f"mmdebstrap failed ({r.returncode}):\n{(r.stderr or r.stdout)[-4000:]}")
    size = tarball.stat().st_size
    print(f"built {tarball} ({size / 2**20:.0f} MiB) in {time.monotonic() - started:.0f} s", flush=True)
    return tarball


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the appliance OS image (a root file system tarball).")
    p.add_argument("--out", default=str(ROOT / "dist" / "image"), help="where the tarball goes (default dist/image)")
    p.add_argument("--gpu", action="store_true", help="the GPU variant: CUDA and cuDNN runtime wheels, the NVIDIA "
                   "devices for the appliance, the MPS daemon's unit (the driver comes from the host's packages)")
    p.add_argument("--customize", help=argparse.SUPPRESS)  # mmdebstrap's hook calls back with the root
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.customize:
            customize(Path(args.customize), Path(args.bundle), args.gpu)
        else:
            build(Path(args.out), args.gpu)
    except ImageError as e:
        print(f"make image: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
