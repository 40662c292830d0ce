"""The OS image boots to serving: `make image`'s root file system, booted with ``systemd-nspawn --boot``
(systemd as the container's PID 1, the image's own units), provisions itself from a "USB stick" against a
real AppStore on loopback, and its appliance turns a frame into an event.

Slow (it builds the image, about a minute and 1.1 GB, and the GPU image, about two minutes and 4.4 GB);
run by ``make image-test``, which ``.ci/run`` calls
after ``make test``. Needs root, mmdebstrap and systemd-nspawn (``tools/system-packages image``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from image.build import STATE, build
from tests.conftest import ROOT, Publisher, Subscriber, answers, free_port, wait_until
from tests.test_provisioning import PASSWORD, provision
from tests.test_sync import Shop, make_shop

pytestmark = [pytest.mark.slow, pytest.mark.image,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None
                                 or shutil.which("mmdebstrap") is None,
                                 reason="needs root, mmdebstrap and systemd-nspawn (tools/system-packages image)")]

SERIAL = "SN-IMG-0001"
DEVICE = "image-box"
WATCHDOG_S = 6
BOOT_TIMEOUT_S = 240  # first boot: provisioning, the AppStore's app and model, the worker's start


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, float, int]]:
    out = tmp_path_factory.mktemp("image")
    started = time.monotonic()
    tarball = build(out)
    built_s = time.monotonic() - started
    root = out / "root"
    root.mkdir()
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="fully_trusted")  # our own image: devices, owners and links as built
    yield root, built_s, tarball.stat().st_size
    shutil.rmtree(root, ignore_errors=True)


def uid_of(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no user {user} in the image")


def running_daemon(uid: int) -> dict[str, str] | None:
    """/proc/PID/status of the booted appliance's daemon (``appliance.cli run``, running as ``uid``), if any."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            status = dict(line.split(":\t", 1) for line in (proc / "status").read_text().splitlines() if ":\t" in line)
        except (OSError, ValueError):
            continue
        if b"appliance" in cmdline and b"run" in cmdline.split(b"\0") and status.get("Uid", "").split()[0] == str(uid):
            return {k: v.strip() for k, v in status.items()}
    return None


def test_the_image_boots_provisions_itself_and_serves(rootfs: tuple[Path, float, int], tmp_path: Path,
                                                       models: dict[str, Path]) -> None:
    root, built_s, size = rootfs
    print(f"\nimage built in {built_s:.0f} s, {size / 2**20:.0f} MiB")
    state = root / STATE.lstrip("/")
    units = [f"/etc/systemd/system/{u}" for u in ("appliance.service", "appliance-provision.service")]
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *units], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0 and not r.stderr.strip(), f"the units verify inside the image: {r.stderr}"

    shop: Shop = make_shop(tmp_path, models)
    try:
        # the factory, the owner's office and the stick, with the real CLIs
        maker, owner, usb = tmp_path / "maker", tmp_path / "owner", tmp_path / "usb"
        provision("maker", "init", "--dir", str(maker), "--name", "Acme Edge")
        provision("owner", "init", "--dir", str(owner), "--name", "Coal Group Ops")
        subprocess.run([".venv/bin/appstore", "--repo", str(shop.repo), "makers", "add", str(maker / "ca.pem")],
                       cwd=ROOT, check=True, capture_output=True)
        provision("device", "make", SERIAL, "--maker", str(maker), "--state-dir", str(state))
        uid, gid = uid_of(root, "appliance")
        for path in [state, *state.rglob("*")]:
            os.lchown(path, uid, gid)
        voucher = tmp_path / "voucher.json"
        provision("voucher", SERIAL, "--maker", str(maker), "--owner", str(owner / "owner.pem"), "--out", str(voucher))
        password_hash = subprocess.run([".venv/bin/appliance", "users", "hash-password", "site-admin",
                                        "--password-stdin"], input=PASSWORD + "\n", cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout.strip()
        http_port, mqtt_port = free_port(), free_port()
        site = tmp_path / "site.toml"
        site.write_text(textwrap.dedent(f"""\
            serial = "{SERIAL}"
            device_id = "{DEVICE}"
            site = "Image test bench"
            [appstore]
            url = "{shop.url}/"
            root = "{shop.root}"
            channel = "stable"
            [admin]
            name = "site-admin"
            password_hash = "{password_hash}"
            [settings.http]
            port = {http_port}
            [settings.broker]
            port = {mqtt_port}
            """))
        provision("site", "make", str(site), "--owner", str(owner), "--voucher", str(voucher), "--out", str(usb),
                  "--register", shop.url, env={**os.environ, "APPSTORE_TOKEN": shop.admin})
        for path in [usb, *usb.rglob("*")]:  # as a FAT stick mounts: readable by everyone, owned by no one
            path.chmod(0o755 if path.is_dir() else 0o644)

        # the watchdog made short for the test (the image's is 60 s), so that the hung daemon below is seen soon
        dropin = root / "etc" / "systemd" / "system" / "appliance.service.d"
        dropin.mkdir(exist_ok=True)
        (dropin / "test-watchdog.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_S}\nRestartSec=1\n")
        log = tmp_path / "boot.log"
        started = time.monotonic()
        with open(log, "wb") as out:
            boot = subprocess.Popen(["systemd-nspawn", "--directory", str(root), "--boot", "--register=no",
                                     "--keep-unit", f"--bind-ro={usb}:/media/usb", "--quiet"],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(answers(f"http://127.0.0.1:{http_port}/healthz", boot, log, "the container"), BOOT_TIMEOUT_S, interval=0.5, what=f"the booted appliance's /healthz (log: {log})")
            serving = time.monotonic() - started
            status = httpx.get(f"http://127.0.0.1:{http_port}/api/status", timeout=5).json()
            assert status["device"] == DEVICE and status["version"] == "0.1.0"
            wait_until(lambda: any(a["name"] == "ppe-watch" and a["state"] == "serving" for a in
                                   httpx.get(f"http://127.0.0.1:{http_port}/api/status", timeout=5).json()["apps"]),
                       120, interval=0.5, what="the channel's app serving in the image")
            sub = Subscriber(mqtt_port, f"appliance/{DEVICE}/events")
            pub = Publisher(mqtt_port)
            try:
                from appliance.demo.scene import render_frame
                wait_until(lambda: (pub.publish("cameras/cam1/frame", render_frame(0.0, 0)),
                                    not sub.messages.empty())[1], 60, interval=0.3, what="an event from the image")
            finally:
                pub.close()
                sub.close()
            # the sandbox is in force on the running daemon (seen from the host: the container shares its kernel)
            daemon = running_daemon(uid)
            assert daemon is not None, f"no appliance daemon running as uid {uid}"
            assert daemon["NoNewPrivs"] == "1" and daemon["Seccomp"] == "2" and int(daemon["CapBnd"], 16) == 0, daemon
            print(f"boot to serving: {serving:.0f} s; to the first event: {time.monotonic() - started:.0f} s")

            # a hung daemon: its event loop stops feeding the watchdog; systemd kills the unit and starts it again
            os.kill(int(daemon["Pid"]), signal.SIGSTOP)
            hung = time.monotonic()

            def replaced() -> bool:
                now = running_daemon(uid)
                return now is not None and now["Pid"] != daemon["Pid"] and answers(
                    f"http://127.0.0.1:{http_port}/healthz", boot, log, "the container")()

            wait_until(replaced, 90, interval=0.5, what="a new daemon after the watchdog fired")
            print(f"hung daemon replaced and serving after {time.monotonic() - hung:.0f} s (WatchdogSec={WATCHDOG_S})")
        finally:
            boot.send_signal(signal.SIGTERM)  # nspawn halts the container: systemd stops the units in order
            try:
                boot.wait(90)
            except subprocess.TimeoutExpired:
                boot.kill()
                boot.wait(10)
        # what systemd inside said of the units (its journal, in the image's state; the console cuts names)
        journal = subprocess.run(["journalctl", "--directory", str(root / "var" / "log" / "journal"), "--no-pager",
                                  "-o", "cat", "-u", "appliance.service", "-u", "appliance-provision.service"],
                                 capture_output=True, text=True, timeout=60, check=False).stdout
        for line in ("Finished appliance-provision.service", "Started appliance.service",
                     "Stopped appliance.service"):
            assert line in journal, f"the journal shows {line!r}:\n{journal[-3000:]}"
        assert "appliance.service: Watchdog timeout" in journal, journal[-3000:]
        failures = [line for line in journal.splitlines() if "Failed with result" in line]
        assert failures == ["appliance.service: Failed with result 'watchdog'."], failures
    finally:
        shop.server.should_exit = True


GPU_CHECK = """\
import re
import onnxruntime as ort
ort.preload_dlls(directory="")  # the CUDA and cuDNN runtimes from the release's NVIDIA wheels
maps = open("/proc/self/maps").read()
print("providers", *ort.get_available_providers())
print("loaded", *sorted(set(re.findall(r"(lib(?:cudnn|cublas|cudart|cufft|curand)[A-Za-z]*)\\.so", maps))))
"""


def test_the_gpu_image_carries_the_cuda_runtimes_and_gives_the_appliance_only_the_nvidia_devices(
        tmp_path: Path) -> None:
    """No GPU here: the GPU image is built and checked as far as a machine without one can — its release loads
    every CUDA and cuDNN runtime library ONNX Runtime's CUDA provider needs, and its units verify."""
    started = time.monotonic()
    tarball = build(tmp_path / "out", gpu=True)
    print(f"\nGPU image built in {time.monotonic() - started:.0f} s, {tarball.stat().st_size / 2**20:.0f} MiB")
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="fully_trusted")
    tarball.unlink()  # 4 GB: not kept longer than needed
    system = root / "etc" / "systemd" / "system"
    assert (system / "appliance.service.d" / "gpu.conf").is_file()
    assert (system / "multi-user.target.wants" / "nvidia-mps.service").is_symlink(), "the MPS daemon is enabled"
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/appliance.service"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    check = tmp_path / "gpu_check.py"
    check.write_text(GPU_CHECK)
    r = subprocess.run(["systemd-nspawn", "--directory", str(root), "--register=no", "--keep-unit", "--pipe",
                        "--quiet", f"--bind-ro={check}:/opt/gpu_check.py", f"{STATE}/current/bin/python",
                        "/opt/gpu_check.py"], capture_output=True, text=True, timeout=120, check=False)
    out = r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CUDAExecutionProvider" in out, out
    for lib in ("libcudart", "libcublas", "libcudnn", "libcufft", "libcurand"):
        assert lib in out, f"{lib} loads from the release: {out}"
    shutil.rmtree(root, ignore_errors=True)
