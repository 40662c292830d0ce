"""``appstore``: run the reference central AppStore. A thin adapter over the library.

    appstore --repo DIR keys init
    appstore --repo DIR publish model FOLDER | publish app APP.json | publish release FOLDER
    appstore --repo DIR channel set CHANNEL [--app NAME=VERSION ...] [--appliance VERSION] [--percent P | --group G ...]
    appstore --repo DIR channel promote|halt|show CHANNEL
    appstore --repo DIR timestamp refresh
    appstore --repo DIR devices [add ID | remove ID]
    appstore --repo DIR admin-token
    appstore --repo DIR samples [--device D] [--reason R] [--limit N] [--json]
    appstore --repo DIR serve [--host H --port P]

Errors print one line, ``error: ...``, saying what was wrong and what to do, and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appstore import catalog, channels
from appstore.bootstrap import Bootstrap
from appstore.errors import AppStoreError, BadRequest, ChannelError
from appstore.fleet import Fleet
from appstore.layout import Expiry
from appstore.repository import ROOT_WARNING, Repository
from appstore.samples import Inbox
from appstore.view import fleet_view
from formats import FormatError
from formats.model_card import NAME_PATTERN, VERSION_PATTERN
from formats.sample import REASONS
from pki.certs import common_name

DEFAULT_REPO = "appstore-repo"


def _repo(args: argparse.Namespace) -> Repository:
    return Repository(Path(args.repo))


def _fleet(repo: Repository) -> Fleet:
    return Fleet(repo.layout.fleet_db)


def _time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _channel_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise ChannelError(f"channel name {name!r} is not valid; use lowercase letters, digits, '.', '_' and '-'")
    return name


def _apps(pairs: Sequence[str]) -> dict[str, str]:
    apps: dict[str, str] = {}
    for pair in pairs:
        name, sep, version = pair.partition("=")
        if not sep or not re.match(NAME_PATTERN, name) or not re.match(VERSION_PATTERN, version):
            raise ChannelError(f"--app {pair!r}: write NAME=VERSION, e.g. --app ppe-watch=1.0.0")
        if name in apps:
            raise ChannelError(f"--app names {name} twice; a channel runs one version of each app")
        apps[name] = version
    return apps


def cmd_keys(args: argparse.Namespace) -> int:
    expiry = Expiry(args.root_expires_days, args.targets_expires_days, args.snapshot_expires_days,
                    args.timestamp_expires_hours)
    if min(expiry.root_days, expiry.targets_days, expiry.snapshot_days, expiry.timestamp_hours) <= 0:
        raise AppStoreError("every --*-expires-* period must be above 0")
    repo, root_files = Repository.create(Path(args.repo), args.root_threshold, args.root_keys, expiry)
    layout = repo.layout
    print(f"created the AppStore repository {layout.folder} (root: {args.root_threshold} of {args.root_keys} keys, "
          "consistent snapshots)")
    print(f"  trusted root for the appliances: {layout.metadata / '1.root.json'}")
    print(f"  online keys (publish, serve): {', '.join(str(layout.keys / f'{r}.json') for r in ('targets', 'snapshot', 'timestamp'))}")
    print(f"  ROOT KEYS: {', '.join(str(p) for p in root_files)}")
    print("  The root keys belong offline: move each to its own offline medium now. They are needed only to "
          "rotate keys; publishing and serving never use them.")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    repo = _repo(args)
    publish = {"model": catalog.publish_model, "app": catalog.publish_app, "release": catalog.publish_release}
    p = publish[args.kind](repo, Path(args.path))
    if p.unchanged:
        print(f"{p.kind} {p.name} {p.version} is already published with these bytes; nothing changed")
    else:
        print(f"published {p.kind} {p.name} {p.version}: {', '.join(p.targets)} "
              f"(targets version {repo.targets().signed.version})")
    return 0


def cmd_channel(args: argparse.Namespace) -> int:
    repo = _repo(args)
    channel = _channel_name(args.channel)
    if args.action == "set":
        fleet = _fleet(repo)
        apps = _apps(args.app) if args.app else None
        appliance = _version(args.appliance, "--appliance") if args.appliance else None
        if args.percent is None and not args.group:
            doc = channels.set_apps(repo, fleet, channel, apps, appliance, args.allow_downgrade)
            print(f"channel {channel} version {doc.version} runs {_runs(doc.apps, doc.appliance)}")
        else:
            if args.allow_downgrade:
                raise ChannelError("--allow-downgrade applies to the channel, not to a rollout: set it without "
                                   "--percent/--group")
            doc = channels.start_rollout(repo, fleet, channel, apps, args.percent or 0, args.group or [],
                                         args.max_unhealthy_share, args.window_s, appliance)
            r = doc.rollout
            assert r is not None
            print(f"channel {channel} version {doc.version}: rollout {r.id} of {_runs(r.apps, r.appliance)} to "
                  f"{r.percent}% of devices{' and groups ' + ', '.join(r.groups) if r.groups else ''}; halts by "
                  f"itself if more than {r.max_unhealthy_share:.0%} report unhealthy within {r.window_s} s")
    elif args.action == "promote":
        doc = channels.promote(repo, _fleet(repo), channel)
        print(f"channel {channel} version {doc.version} runs {_runs(doc.apps, doc.appliance)} (rollout promoted)")
    elif args.action == "halt":
        halted = channels.halt(repo, channel, args.reason)
        assert halted is not None and halted.rollout is not None
        print(f"channel {channel} version {halted.version}: rollout {halted.rollout.id} halted; its devices go "
              f"back to {_pairs(halted.apps)}")
    else:
        print(channels.read(repo, channel).to_json(), end="")
    return 0


def _pairs(apps: dict[str, str]) -> str:
    return ", ".join(f"{n} {v}" for n, v in sorted(apps.items()))


def _runs(apps: dict[str, str], appliance: str | None) -> str:
    parts = [_pairs(apps)] if apps else []
    if appliance:
        parts.append(f"appliance {appliance}")
    return ", ".join(parts) or "nothing"


def _version(value: str, option: str) -> str:
    if not re.match(VERSION_PATTERN, value):
        raise ChannelError(f"{option} {value!r}: give a version such as 0.2.0")
    return value


def cmd_timestamp(args: argparse.Namespace) -> int:
    if args.expires_hours is not None and args.expires_hours <= 0:
        raise AppStoreError("--expires-hours must be above 0")
    expires = timedelta(hours=args.expires_hours) if args.expires_hours is not None else None
    r = _repo(args).refresh(expires)
    print(f"timestamp version {r.timestamp_version}, valid until {r.timestamp_expires.isoformat()}")
    if r.resigned_targets:
        print("targets and snapshot were past half their validity and were re-signed too")
    if r.root_expires - datetime.now(UTC) < ROOT_WARNING:
        print(f"warning: root expires {r.root_expires.isoformat()}; sign a new root with the offline root keys "
              "before then", file=sys.stderr)
    return 0


def _ago(ts: float | None) -> str:
    return f"{_time(ts)} ({time.time() - ts:.0f} s ago)" if ts else "never"


def cmd_devices(args: argparse.Namespace) -> int:
    repo = _repo(args)
    fleet = _fleet(repo)
    if args.action == "add":
        token = fleet.add_device(args.id, args.group or "", args.channel or "")
        print(f"registered device {args.id}; its token (shown only now, give it to the device's settings):")
        print(token)
        return 0
    if args.action == "remove":
        fleet.remove_device(args.id)
        print(f"removed device {args.id} and its token")
        return 0
    view = fleet_view(repo, fleet)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    if not view["devices"]:
        print("no devices yet; register one with: appstore devices add ID --channel CHANNEL")
    else:
        print(f"{'device':<16} {'channel':<10} {'group':<10} {'appliance':<22} {'versions':<28} {'health':<24} "
              f"{'rollout':<10} last seen")
    for d in view["devices"]:
        health = "-" if d["health"] is None else "ok" if d["health"]["ok"] else f"UNHEALTHY {d['health']['reason']}"
        rollout = d["rollout"] or (f"({d['in_rollout']})" if d["in_rollout"] else "-")
        print(f"{d['id']:<16} {d['channel'] or '-':<10} {d['group'] or '-':<10} {_appliance(d):<22} "
              f"{_pairs(d['versions']) or '-':<28} "
              f"{health:<24} {rollout:<10} {_ago(d['last_seen'])}")
    if view["rollouts"]:
        print("\nrollouts:")
    for r in view["rollouts"]:
        line = f"  {r['channel']:<10} {r['id']:<6} {r['state']:<22} started {_time(r['started'])}"
        if "apps" in r:
            line += (f"  {_runs(r['apps'], r.get('appliance'))} to {r['percent']}%{' + ' + ','.join(r['groups']) if r['groups'] else ''}"
                     f"  devices {len(r['devices'])}, unhealthy {len(r['unhealthy'])}")
        else:
            line += f"  ended {_time(r['ended'])}"
        print(line)
        if r.get("reason"):
            print(f"             {r['reason']}")
    return 0


def _appliance(device: dict[str, object]) -> str:
    """``0.1.0``, ``0.1.0 -> 0.2.0 installing`` or ``0.1.0 (0.2.0 refused)``: the version and the upgrade's state."""
    version = str(device.get("version") or "-")
    up = device.get("upgrade")
    if not isinstance(up, dict) or not up.get("desired") or up.get("desired") == version:
        return version
    state = str(up.get("state", ""))
    if state in ("refused", "rolled back"):
        return f"{version} ({up['desired']} {state})"
    return f"{version} -> {up['desired']} {state}"


def cmd_admin_token(args: argparse.Namespace) -> int:
    token = _fleet(_repo(args)).add_admin_token(args.note or "")
    print("admin token for GET /v1/devices (shown only now):")
    print(token)
    return 0


def cmd_makers(args: argparse.Namespace) -> int:
    repo = _repo(args)
    boot = Bootstrap(repo.layout.folder, _fleet(repo))
    if args.action == "add":
        path = Path(args.ca)
        try:
            name = boot.trust_maker(path.read_bytes(), str(path))
        except OSError as e:
            raise BadRequest(f"{path}: cannot read: {e.strerror}") from e
        print(f"boxes made by {name} may now fetch their provisioning bundles and enrol")
    else:
        for ca in boot.makers():
            print(common_name(ca))
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    repo = _repo(args)
    path = Path(args.bundle)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BadRequest(f"{path}: cannot read: {e.strerror}") from e
    c = Bootstrap(repo.layout.folder, _fleet(repo)).register(raw, str(path)).conveyed
    print(f"registered box {c.serial} as {c.device_id} (version {c.version}, channel {c.appstore.channel})")
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    repo = _repo(args)
    view = Inbox(repo.layout, _fleet(repo)).view(args.device, args.reason, args.limit)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    if not view["samples"]:
        print("no samples match" if args.device or args.reason else
              "no samples yet; devices send them to PUT /v1/devices/ID/samples/SAMPLE_ID (docs/samples.md)")
        return 0
    print(f"{'received':<19} {'device':<16} {'sample':<32} {'reason':<16} {'app':<18} {'source':<10} "
          f"{'predictions':>11} image")
    for s in view["samples"]:
        meta = s["meta"]
        app = f"{meta.get('app', '')} {meta.get('app_version', '')}".strip() or "-"
        image = f"{meta['image']['width']}x{meta['image']['height']}" if s["has_image"] else "-"
        print(f"{_time(s['received']):<19} {meta['device']:<16} {meta['id']:<32} {meta['reason']:<16} {app:<18} "
              f"{meta.get('source') or '-':<10} {len(meta.get('predictions', [])):>11} {image}")
    shown = len(view["samples"])
    print(f"\n{view['total']} samples{f' (the newest {shown} shown)' if shown < view['total'] else ''}")
    print("  by device: " + ", ".join(f"{d} {n}" for d, n in view["counts"]["device"].items()))
    print("  by reason: " + ", ".join(f"{r} {n}" for r, n in view["counts"]["reason"].items()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from appstore.server import Tls, serve

    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("appstore serve: give --tls-cert and --tls-key together")
    if args.tls_cert is None and (args.client_certificates or args.bootstrap_port):
        raise SystemExit("appstore serve: --client-certificates and --bootstrap-port need HTTPS (--tls-cert, --tls-key)")
    tls = Tls(Path(args.tls_cert), Path(args.tls_key), args.client_certificates, args.bootstrap_port) \
        if args.tls_cert else None
    serve(Path(args.repo), args.host, args.port, tls)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appstore", description="The reference central AppStore (a TUF repository "
                                "and a fleet API).")
    p.add_argument("--repo", default=os.environ.get("APPSTORE_REPO", DEFAULT_REPO),
                   help=f"the AppStore folder (default: $APPSTORE_REPO or ./{DEFAULT_REPO})")
    sub = p.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="create the repository and its keys")
    ksub = keys.add_subparsers(dest="action", required=True)
    kinit = ksub.add_parser("init", help="generate keys and write version 1 of the metadata")
    kinit.add_argument("--root-threshold", type=int, default=2, help="root signatures required (default 2)")
    kinit.add_argument("--root-keys", type=int, default=3, help="root keys to generate (default 3)")
    defaults = Expiry()
    kinit.add_argument("--root-expires-days", type=float, default=defaults.root_days)
    kinit.add_argument("--targets-expires-days", type=float, default=defaults.targets_days)
    kinit.add_argument("--snapshot-expires-days", type=float, default=defaults.snapshot_days)
    kinit.add_argument("--timestamp-expires-hours", type=float, default=defaults.timestamp_hours)
    keys.set_defaults(func=cmd_keys)

    pub = sub.add_parser("publish", help="publish a model package or an app (versions are immutable)")
    psub = pub.add_subparsers(dest="kind", required=True)
    psub.add_parser("model", help="a folder holding model.onnx and model.json").add_argument("path")
    psub.add_parser("app", help="an app.json whose model is published").add_argument("path")
    psub.add_parser("release", help="an appliance release folder made by `make bundle` (release.json and its "
                    "wheels)").add_argument("path")
    pub.set_defaults(func=cmd_publish)

    ch = sub.add_parser("channel", help="what a channel runs, and staged rollouts")
    csub = ch.add_subparsers(dest="action", required=True)
    cset = csub.add_parser("set", help="set the channel's apps, or with --percent/--group start a rollout")
    cset.add_argument("channel")
    cset.add_argument("--app", action="append", metavar="NAME=VERSION",
                      help="an app the channel runs; repeat for each (the full set; default: the apps as they are)")
    cset.add_argument("--appliance", metavar="VERSION", help="the appliance release the channel runs (published "
                      "with `appstore publish release`)")
    cset.add_argument("--allow-downgrade", action="store_true",
                      help="let devices on a newer release go back to --appliance (refused otherwise)")
    cset.add_argument("--percent", type=int, help="roll out to this share of the channel's devices (0-100)")
    cset.add_argument("--group", action="append", help="roll out to devices of this group; repeatable")
    cset.add_argument("--max-unhealthy-share", type=float, default=0.2,
                      help="halt the rollout when more than this share of its devices report unhealthy (default 0.2)")
    cset.add_argument("--window-s", type=int, default=600, help="seconds after the start the halt watches (default 600)")
    csub.add_parser("promote", help="make the rollout's apps the channel's apps").add_argument("channel")
    chalt = csub.add_parser("halt", help="halt the rollout; its devices go back to the channel's apps")
    chalt.add_argument("channel")
    chalt.add_argument("--reason", required=True)
    csub.add_parser("show", help="print the channel document").add_argument("channel")
    ch.set_defaults(func=cmd_channel)

    ts = sub.add_parser("timestamp", help="keep the metadata fresh (run from cron)")
    tsub = ts.add_subparsers(dest="action", required=True)
    tref = tsub.add_parser("refresh", help="re-sign timestamp (and targets and snapshot when half expired)")
    tref.add_argument("--expires-hours", type=float, help="validity of the new timestamp (default: the repository's)")
    ts.set_defaults(func=cmd_timestamp)

    dev = sub.add_parser("devices", help="the fleet: list devices and rollouts, add or remove a device")
    dev.add_argument("--json", action="store_true")
    dsub = dev.add_subparsers(dest="action")
    dadd = dsub.add_parser("add", help="register a device and print its token once")
    dadd.add_argument("id")
    dadd.add_argument("--group")
    dadd.add_argument("--channel")
    dsub.add_parser("remove", help="remove a device and its token").add_argument("id")
    dsub.add_parser("list", help="list devices and rollouts (the default)")
    dev.set_defaults(func=cmd_devices)

    adm = sub.add_parser("admin-token", help="make a token for GET /v1/devices and print it once")
    adm.add_argument("--note", help="what the token is for")
    adm.set_defaults(func=cmd_admin_token)

    mk = sub.add_parser("makers", help="maker CAs whose boxes may fetch provisioning bundles and enrol")
    mksub = mk.add_subparsers(dest="action", required=True)
    mksub.add_parser("add", help="trust a maker's CA certificate (ca.pem from provision maker init)").add_argument("ca")
    mksub.add_parser("list", help="list the trusted makers")
    mk.set_defaults(func=cmd_makers)

    bs = sub.add_parser("bootstrap", help="zero-touch provisioning: register a box's bundle for it to fetch")
    bssub = bs.add_subparsers(dest="action", required=True)
    bssub.add_parser("add", help="register a provisioning.json (from provision site make)").add_argument("bundle")
    bs.set_defaults(func=cmd_bootstrap)

    smp = sub.add_parser("samples", help="the hard samples the devices sent (newest first), with counts")
    smp.add_argument("--device", help="only this device's")
    smp.add_argument("--reason", help=f"only those sent for this reason: {', '.join(REASONS)}")
    smp.add_argument("--limit", type=int, default=100, help="list at most this many (default 100; counts are of all)")
    smp.add_argument("--json", action="store_true", help="print what GET /v1/samples answers")
    smp.set_defaults(func=cmd_samples)

    srv = sub.add_parser("serve", help="serve metadata, targets, the fleet API and the sample inbox over HTTP")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8600)
    srv.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) ...")
    srv.add_argument("--tls-key", help="... and its key")
    srv.add_argument("--client-certificates", action="store_true",
                     help="the main address takes only clients with a certificate from the fleet CA (DIR/fleet-ca/ca.pem), "
                          "which boxes get when they enrol")
    srv.add_argument("--bootstrap-port", type=int,
                     help="also serve bootstrap and enrolment, without a client certificate, on this port (what a "
                          "box's site configuration names as appstore.enrol_url)")
    srv.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except (AppStoreError, FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
