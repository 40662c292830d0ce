"""Channels: set what a channel runs, roll a change out to part of it, promote or halt the rollout.

Each change reads the channel document under the repository's lock, bumps its ``version``, and publishes it
as target ``channels/{channel}.json`` (signed like every other target). Only published app versions can be
named. When a rollout starts, its start time goes into the fleet registry: the automatic halt watches the
rollout's window from then.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from pydantic import ValidationError

from appstore import paths
from appstore.errors import ChannelError
from appstore.fleet import Fleet
from appstore.repository import Repository, TargetsEditor
from formats.channel import ChannelDoc
from formats.errors import describe_validation_error
from formats.release import release_manifest_target


def _current(edit: TargetsEditor, channel: str) -> ChannelDoc | None:
    path = paths.channel(channel)
    if edit.get(path) is None:
        return None
    return ChannelDoc.parse(edit.read(path), path)


def _require(edit: TargetsEditor, channel: str) -> ChannelDoc:
    doc = _current(edit, channel)
    if doc is None:
        raise ChannelError(f"no channel {channel!r}; create it with: appstore channel set {channel} --app NAME=VERSION")
    return doc


def _check_published(edit: TargetsEditor, apps: Mapping[str, str], appliance: str | None = None) -> None:
    if appliance is not None and edit.get(release_manifest_target(appliance)) is None:
        raise ChannelError(f"appliance release {appliance} is not published; build it with `make bundle` and publish "
                           "it with: appstore publish release <folder>")
    for name, version in apps.items():
        if edit.get(paths.app_manifest(name, version)) is None:
            raise ChannelError(f"app {name} {version} is not published; publish it first with: "
                               "appstore publish app <app.json>")


def _build(**fields: object) -> ChannelDoc:
    try:
        return ChannelDoc.model_validate(fields)
    except ValidationError as e:
        raise ChannelError(describe_validation_error(e, "channel", docs="docs/appstore.md")) from e


def _publish(edit: TargetsEditor, doc: ChannelDoc) -> ChannelDoc:
    edit.put(paths.channel(doc.channel), doc.to_json().encode(),
             {"kind": "channel", "channel": doc.channel, "version": doc.version})
    return doc


def read(repo: Repository, channel: str) -> ChannelDoc:
    """The channel's current document; ChannelError if there is no such channel."""
    path = paths.channel(channel)
    raw = repo.read_target(path)
    if raw is None:
        raise ChannelError(f"no channel {channel!r}; create it with: appstore channel set {channel} --app NAME=VERSION")
    return ChannelDoc.parse(raw, path)


def _wanted(old: ChannelDoc | None, channel: str, apps: Mapping[str, str] | None,
            appliance: str | None) -> tuple[dict[str, str], str | None]:
    """The apps and appliance release a change names; what it leaves out stays as the channel has it."""
    if apps is None and appliance is None:
        raise ChannelError("name the apps (--app NAME=VERSION) or the appliance release (--appliance VERSION)")
    if apps is None and old is None:
        raise ChannelError(f"no channel {channel!r} yet; create it with --app NAME=VERSION for each app it runs")
    return (dict(apps) if apps is not None else dict(old.apps if old else {}),
            appliance if appliance is not None else (old.appliance if old else None))


def set_apps(repo: Repository, fleet: Fleet, channel: str, apps: Mapping[str, str] | None,
             appliance: str | None = None, allow_downgrade: bool = False) -> ChannelDoc:
    """Make ``apps`` (and the ``appliance`` release) what every appliance on the channel runs, creating the
    channel if need be; what is not named stays as it is."""
    with repo.edit_targets() as edit:
        old = _current(edit, channel)
        want, release = _wanted(old, channel, apps, appliance)
        _check_published(edit, want, appliance)
        if old is not None and old.rollout is not None and not old.rollout.halted:
            raise ChannelError(f"channel {channel} has rollout {old.rollout.id} under way; promote it "
                               f"(appstore channel promote {channel}) or halt it (appstore channel halt {channel} "
                               "--reason ...) first")
        doc = _publish(edit, _build(channel=channel, version=old.version + 1 if old else 1, apps=want,
                                    appliance=release, allow_downgrade=allow_downgrade or None))
    if old is not None and old.rollout is not None:
        fleet.end_rollout(channel, old.rollout.id, "replaced", time.time())
    return doc


def start_rollout(repo: Repository, fleet: Fleet, channel: str, apps: Mapping[str, str] | None, percent: int = 0,
                  groups: Sequence[str] = (), max_unhealthy_share: float = 0.2, window_s: int = 600,
                  appliance: str | None = None) -> ChannelDoc:
    """Start a rollout of ``apps`` (and the ``appliance`` release) to ``percent`` of the channel and to
    ``groups``; what it does not name stays as the channel has it. Its id is ``r{version}``."""
    if percent <= 0 and not groups:
        raise ChannelError("a rollout needs --percent above 0 or at least one --group")
    with repo.edit_targets() as edit:
        old = _require(edit, channel)
        want, release = _wanted(old, channel, apps, appliance)
        _check_published(edit, want, appliance)
        if old.rollout is not None and not old.rollout.halted:
            raise ChannelError(f"channel {channel} has rollout {old.rollout.id} under way; promote or halt it first")
        version = old.version + 1
        rollout = {"id": f"r{version}", "apps": want, "appliance": release, "percent": percent,
                   "groups": list(groups), "max_unhealthy_share": max_unhealthy_share, "window_s": window_s}
        doc = _publish(edit, _build(channel=channel, version=version, apps=dict(old.apps), appliance=old.appliance,
                                    allow_downgrade=old.allow_downgrade, rollout=rollout))
    assert doc.rollout is not None
    fleet.start_rollout(channel, doc.rollout.id, time.time())
    return doc


def promote(repo: Repository, fleet: Fleet, channel: str) -> ChannelDoc:
    """Make the rollout's apps the channel's apps and drop the rollout."""
    with repo.edit_targets() as edit:
        old = _require(edit, channel)
        if old.rollout is None:
            raise ChannelError(f"channel {channel} has no rollout to promote; start one with: "
                               f"appstore channel set {channel} --app NAME=VERSION --percent P")
        if old.rollout.halted:
            raise ChannelError(f"rollout {old.rollout.id} of {channel} is halted ({old.rollout.reason}); "
                               "start a new rollout or set the apps directly")
        rollout_id = old.rollout.id
        doc = _publish(edit, _build(channel=channel, version=old.version + 1, apps=dict(old.rollout.apps),
                                    appliance=old.rollout.appliance, allow_downgrade=old.allow_downgrade))
    fleet.end_rollout(channel, rollout_id, "promoted", time.time())
    return doc


def halt(repo: Repository, channel: str, reason: str, rollout_id: str | None = None) -> ChannelDoc | None:
    """Halt the channel's rollout with ``reason``; its appliances go back to the channel's apps.

    With ``rollout_id`` (the automatic halt) nothing happens and None is returned unless that rollout is
    still the channel's and still running, so two reports that trip at once halt it once.
    """
    if not reason.strip():
        raise ChannelError("say why with --reason: the appliances' operators will read it")
    with repo.edit_targets() as edit:
        old = _require(edit, channel)
        rollout = old.rollout
        if rollout_id is not None and (rollout is None or rollout.halted or rollout.id != rollout_id):
            return None
        if rollout is None or rollout.halted:
            state = f"rollout {rollout.id} is already halted" if rollout else "there is no rollout"
            raise ChannelError(f"channel {channel}: {state}; nothing to halt")
        halted = rollout.model_copy(update={"halted": True, "reason": reason})
        return _publish(edit, old.model_copy(update={"version": old.version + 1, "rollout": halted}))
