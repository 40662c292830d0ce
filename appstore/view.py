"""The fleet view: each device's last report beside its channel's desired state, and the rollouts' state.

``GET /v1/devices`` returns it as JSON and ``appstore devices`` prints it as a table.
"""

from __future__ import annotations

import time
from typing import Any

from appstore import channels, guard
from appstore.errors import ChannelError
from appstore.fleet import Fleet
from appstore.repository import Repository
from formats.channel import ChannelDoc, in_rollout


def _docs(repo: Repository, names: set[str]) -> dict[str, ChannelDoc]:
    out = {}
    for name in names:
        try:
            out[name] = channels.read(repo, name)
        except ChannelError:
            continue
    return out


def fleet_view(repo: Repository, fleet: Fleet, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    devices = fleet.devices()
    records = fleet.rollouts()
    docs = _docs(repo, {fleet.channel_of(d) for d in devices} | {r.channel for r in records})
    rows = []
    for d in devices:
        report, channel = d.report, fleet.channel_of(d)
        group = report.group if report and report.group else d.group
        doc = docs.get(channel)
        expected = doc.rollout.id if doc and doc.rollout and in_rollout(doc.rollout, d.id, group) else ""
        rows.append({
            "id": d.id, "channel": channel, "group": group,
            "versions": {n: a.version for n, a in report.apps.items()} if report else {},
            "apps": {n: a.model_dump() for n, a in report.apps.items()} if report else {},
            "health": report.health.model_dump() if report else None,
            "last_seen": d.last_seen, "last_sync": report.last_sync if report else None,
            "last_error": report.last_error if report else "", "version": report.version if report else "",
            "upgrade": report.upgrade.model_dump() if report and report.upgrade else None,
            "appliance_desired": doc.appliance_for(d.id, group) if doc else None,
            "rollout": (report.rollout or "") if report else "",  # what the device says it follows
            "in_rollout": expected,  # the channel's rollout this device belongs to, by group or bucket
        })
    rollouts = []
    for r in records:
        doc = docs.get(r.channel)
        entry: dict[str, Any] = {"channel": r.channel, "id": r.id, "started": r.started, "ended": r.ended,
                                 "state": r.outcome or "ended"}
        current = doc.rollout if doc is not None and doc.rollout is not None and doc.rollout.id == r.id else None
        if doc is not None and current is not None:
            verdict = guard.evaluate(doc, r.started, guard.channel_reports(fleet, r.channel), now)
            state = "halted" if current.halted else "running" if verdict.open else "running (window over)"
            entry.update({
                "state": state, "reason": current.reason, "apps": dict(current.apps), "appliance": current.appliance,
                "percent": current.percent,
                "groups": list(current.groups), "max_unhealthy_share": current.max_unhealthy_share,
                "window_s": current.window_s, "devices": list(verdict.devices),
                "unhealthy": [{"device": dev, "why": why} for dev, why in verdict.unhealthy]})
        rollouts.append(entry)
    return {"devices": rows, "rollouts": rollouts}
