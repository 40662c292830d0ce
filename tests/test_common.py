"""The shared mechanisms in ``common``: the backoff policy every retry loop uses, atomic file writes, and the
crash points of the crash tests."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from common import crashpoint
from common.backoff import Backoff
from common.files import staged_file, write_atomically
from tests.conftest import ROOT


def test_backoff_doubles_up_to_its_cap_and_jitter_only_shortens() -> None:
    policy = Backoff(base_s=2.0, max_s=10.0, jitter=0.5)
    assert [policy.nominal(n) for n in range(6)] == [0.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    rng = random.Random(7)
    delays = [policy.delay(3, rng) for _ in range(200)]
    assert all(4.0 <= d <= 8.0 for d in delays), "within half of the nominal 8 s, never above it"
    assert max(delays) - min(delays) > 2.0, "spread, so a fleet does not retry in step"
    assert policy.delay(10_000) <= 10.0, "a long outage neither overflows nor passes the cap"


def test_backoff_without_jitter_is_exact_and_a_bad_policy_is_refused() -> None:
    assert [Backoff(0.5, 30.0, jitter=0.0).delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=1.5)


def test_an_atomic_write_replaces_the_file_and_leaves_no_temporary_behind(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "snapshot.jpg"
    write_atomically(target, b"old")
    write_atomically(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["snapshot.jpg"]


def test_staged_files_have_unique_names_and_one_that_fails_is_removed(tmp_path: Path) -> None:
    with staged_file(tmp_path, "a.json") as (first, first_tmp), staged_file(tmp_path, "a.json") as (_, second_tmp):
        first.write(b"{}")
        assert first_tmp != second_tmp and first_tmp.parent == tmp_path
        assert first_tmp.name.startswith(".a.json.") and first_tmp.name.endswith(".tmp"), "swept by .*.tmp"
    with pytest.raises(ValueError), staged_file(tmp_path, "b.jpg") as (f, failed):
        f.write(b"half")
        raise ValueError("the checksum did not match")
    assert not failed.exists() and first_tmp.read_bytes() == b"{}"


def test_an_armed_crashpoint_kills_the_process_once_and_an_unarmed_one_does_nothing(tmp_path: Path) -> None:
    program = "from common import crashpoint; crashpoint.reached('step'); print('went on')"
    env = dict(os.environ, **{crashpoint.ENV: str(tmp_path)})

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=30, check=False)

    (tmp_path / "step").touch()
    killed = run()
    assert killed.returncode == -signal.SIGKILL and "went on" not in killed.stdout
    assert not (tmp_path / "step").exists(), "disarmed by the kill"
    again = run()
    assert again.returncode == 0 and "went on" in again.stdout
    del env[crashpoint.ENV]
    (tmp_path / "step").touch()
    assert subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30, check=False).returncode == 0, "off unless the environment names a folder"
