"""The automatic halt of a staged rollout (docs/appstore.md, "Fleet API").

Within ``window_s`` after a rollout started, if more than ``max_unhealthy_share`` of the devices that
report running the rollout's versions report unhealthy, the rollout is halted and the channel re-signed
with the reason. A device runs the rollout's versions when its report names the rollout or shows an app
at a version the rollout changes; it is unhealthy when ``health.ok`` is false or an app of the rollout,
reported at the rollout's version, is not ``serving``, or the appliance release the rollout names was
refused or rolled back on it. Only reports received since the start count.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from appstore import channels
from appstore.errors import ChannelError
from appstore.fleet import Fleet
from appstore.repository import Repository
from formats.channel import ChannelDoc, DeviceReport, Rollout

REASONS_SHOWN = 3  # devices named in a halt reason; the fleet view has them all


@dataclass(frozen=True, slots=True)
class Verdict:
    rollout: str
    devices: tuple[str, ...]  # devices that reported running the rollout's versions since it started
    unhealthy: tuple[tuple[str, str], ...]  # (device, why)
    open: bool  # still within the window, not halted: the guard may halt it
    trips: bool
    reason: str


def runs_rollout(doc: ChannelDoc, rollout: Rollout, report: DeviceReport) -> bool:
    if report.rollout == rollout.id:
        return True
    release = rollout.appliance
    if release is not None and release != doc.appliance and (
            report.version == release or (report.upgrade is not None and report.upgrade.desired == release)):
        return True
    changed = {name: v for name, v in rollout.apps.items() if doc.apps.get(name) != v}
    return any((a := report.apps.get(name)) is not None and a.version == v for name, v in changed.items())


def unhealthy_because(rollout: Rollout, report: DeviceReport) -> str | None:
    if not report.health.ok:
        return f"health: {report.health.reason or 'not ok'}"
    up = report.upgrade
    if rollout.appliance is not None and up is not None and up.desired == rollout.appliance and up.state in (
            "refused", "rolled back"):
        return f"appliance {rollout.appliance} {up.state}: {up.reason or 'no reason given'}"
    for name, version in rollout.apps.items():
        app = report.apps.get(name)
        if app is not None and app.version == version and app.state != "serving":
            return f"{name} {version} {app.state}"
    return None


def evaluate(doc: ChannelDoc, started: float, reports: Iterable[tuple[float, DeviceReport]], now: float) -> Verdict:
    """Judge the channel's rollout from ``(received, report)`` pairs of the channel's devices."""
    rollout = doc.rollout
    if rollout is None:
        return Verdict("", (), (), False, False, "")
    devices: list[str] = []
    unhealthy: list[tuple[str, str]] = []
    for received, report in reports:
        if received < started or not runs_rollout(doc, rollout, report):
            continue
        devices.append(report.device)
        why = unhealthy_because(rollout, report)
        if why is not None:
            unhealthy.append((report.device, why))
    is_open = not rollout.halted and now <= started + rollout.window_s
    trips = is_open and bool(devices) and len(unhealthy) / len(devices) > rollout.max_unhealthy_share
    reason = ""
    if trips:
        named = "; ".join(f"{d}: {why}" for d, why in unhealthy[:REASONS_SHOWN])
        more = f"; and {len(unhealthy) - REASONS_SHOWN} more" if len(unhealthy) > REASONS_SHOWN else ""
        reason = (f"halted by the AppStore: {len(unhealthy)} of {len(devices)} devices running {rollout.id} "
                  f"reported unhealthy (more than {rollout.max_unhealthy_share:.0%} allowed) - {named}{more}")
    return Verdict(rollout.id, tuple(devices), tuple(unhealthy), is_open, trips, reason)


def channel_reports(fleet: Fleet, channel: str) -> list[tuple[float, DeviceReport]]:
    return [(d.last_seen, d.report) for d in fleet.devices()
            if d.report is not None and d.last_seen is not None and fleet.channel_of(d) == channel]


def watch(repo: Repository, fleet: Fleet, channel: str, now: float | None = None) -> ChannelDoc | None:
    """Evaluate the channel's rollout after a report; halt and re-sign it if it trips. Returns the halted doc."""
    try:
        doc = channels.read(repo, channel)
    except ChannelError:
        return None  # a device on a channel that does not exist (yet): nothing to watch
    if doc.rollout is None or doc.rollout.halted:
        return None
    record = fleet.rollout(channel, doc.rollout.id)
    if record is None:
        return None
    verdict = evaluate(doc, record.started, channel_reports(fleet, channel), time.time() if now is None else now)
    if not verdict.trips:
        return None
    return channels.halt(repo, channel, verdict.reason, rollout_id=doc.rollout.id)
