"""``appliance``: run the daemon and manage what it serves. A thin adapter over the library."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError, DaemonUnreachable
from appliance.settings import Settings, load_settings

if TYPE_CHECKING:
    from appliance.auth import Actor
    from appliance.store.records import DeviceRecord


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or os.environ.get("APPLIANCE_CONFIG")
    return load_settings(Path(path) if path else None)


def _store(settings: Settings) -> Any:
    from appliance.store import Store

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return Store(settings.db_path)


def _tls_context(cert: Path) -> ssl.SSLContext:
    """Trust exactly the daemon's own certificate: the CLI talks to it on loopback, where the name in a
    site's certificate would not match."""
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a leaf that is not self-signed can be the anchor
    return context


def _daemon_url(settings: Settings, path: str) -> str:
    h = settings.http
    host = "127.0.0.1" if h.host in ("0.0.0.0", "") else "::1" if h.host == "::" else h.host
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if h.tls else 'http'}://{host}:{h.port}{path}"


def _fetch_status(settings: Settings, request: urllib.request.Request | None = None) -> dict[str, Any]:
    """What ``/api/status`` answers (or ``request``, to another loopback route), as JSON."""
    h = settings.http
    url = _daemon_url(settings, "/api/status")
    context = _tls_context(h.tls_cert) if h.tls_cert else None
    try:
        with urllib.request.urlopen(request or url, timeout=5, context=context) as r:
            result: dict[str, Any] = json.load(r)
            return result
    except urllib.error.HTTPError:
        raise  # it answered: the caller reads the error
    except (urllib.error.URLError, OSError) as e:
        raise DaemonUnreachable(f"the daemon is not answering at {url} ({getattr(e, 'reason', e)}); "
                                "start it with `appliance run` (or check http.host/http.port)") from e


def _time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.settings import use_timezone

    settings = _settings(args)
    use_timezone(settings)  # before the console is imported: it reads the zone once

    from appliance.app import run
    from appliance.logs import setup_logging

    setup_logging(settings.log_level)
    path = args.config or os.environ.get("APPLIANCE_CONFIG")
    return run(settings, config_file=Path(path).resolve() if path else None)


def cmd_models(args: argparse.Namespace) -> int:
    from appliance import packages

    settings = _settings(args)
    with _store(settings) as store:
        if args.action == "add":
            m = packages.install_model(store, settings.models_dir, Path(args.path), by=_cli_actor())
            print(f"installed model {m.name} {m.version} ({m.task}, sha256 {m.sha256[:12]})")
        elif args.action == "remove":
            packages.remove_model(store, args.name, args.version)
            print(f"removed model {args.name} {args.version}")
        else:
            rows = store.models.all()
            if not rows:
                print("no models installed; add one with: appliance models add <folder>")
            for m in rows:
                print(f"{m.name:<24} {m.version:<10} {m.task:<15} {m.size_bytes / 1e6:7.2f} MB  sha256 {m.sha256[:12]}  "
                      f"installed {_time(m.installed_at)}")
    return 0


def _plans(settings: Settings) -> Any:
    from appliance.runtime.inventory import read_inventory
    from appliance.runtime.partitions import plan_partitions

    return plan_partitions(settings.partitions, read_inventory(settings.hardware.inventory_file),
                           settings.state_dir / "tensorrt-cache")


def cmd_hardware(args: argparse.Namespace) -> int:
    from appliance.runtime.inventory import format_cores, format_inventory, read_inventory

    settings = _settings(args)
    inventory = read_inventory(settings.hardware.inventory_file)
    if args.json:
        print(json.dumps(inventory.to_json(), indent=2))
        return 0
    print(format_inventory(inventory))
    print("\npartitions (" + ("auto" if settings.partitions == "auto" else "from settings") + "):")
    for p in _plans(settings):
        cores = f" cores {format_cores(p.cores)}" if p.cores else ""
        mem = f" {p.memory_mb} MB" if p.memory_mb else ""
        env = " ".join(f"{k}={v}" for k, v in p.env.items())
        print(f"  {p.name:<10} {p.device:<14} {p.kind:<6}{cores}{mem} compute {p.compute_percent}%  "
              f"{p.providers[0][0]} {env}")
    return 0


def cmd_apps(args: argparse.Namespace) -> int:
    from appliance import packages

    settings = _settings(args)
    with _store(settings) as store:
        if args.action == "add":
            a = packages.install_app(store, Path(args.path), _plans(settings), settings.placement.pins,
                                     by=_cli_actor())
            print(f"installed app {a.name} {a.version} (model {a.model_name} {a.model_version})")
        elif args.action == "rollback":
            by = _cli_actor()
            a = packages.rollback_app(store, args.name, by.name, by.address)
            print(f"app {a.name} rolled back to {a.version} (model {a.model_name} {a.model_version})")
        elif args.action == "remove":
            store.apps.remove(args.name)
            by = _cli_actor()
            store.audit_log.add(by.name, "app.remove", {"app": args.name}, by.address)
            print(f"removed app {args.name}")
        elif args.action in ("enable", "disable"):
            store.apps.set_enabled(args.name, args.action == "enable")
            by = _cli_actor()
            store.audit_log.add(by.name, f"app.{args.action}", {"app": args.name}, by.address)
            print(f"app {args.name} {args.action}d")
        else:
            rows = store.apps.all()
            if not rows:
                print("no apps installed; add one with: appliance apps add <app.json>")
            for a in rows:
                sources = ", ".join(json.loads(a.manifest_json)["sources"])
                print(f"{a.name:<20} {a.version:<10} model {a.model_name} {a.model_version:<8} "
                      f"{'enabled ' if a.enabled else 'disabled'}  sources {sources}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _store(settings) as store:
        events = store.events.recent(limit=args.limit, app=args.app, source=args.source)
    if args.json:
        print(json.dumps([{"id": e.id, "ts": e.ts, "app": e.app, "source": e.source, "rule": e.rule,
                           "label": e.label, "score": e.score, "box": e.box,
                           "snapshot": e.snapshot} for e in events], indent=2))
        return 0
    if not events:
        print("no events yet")
    for e in events:
        snap = str(settings.state_dir / e.snapshot) if e.snapshot else "-"
        print(f"{_time(e.ts)}  {e.app:<16} {e.source:<10} {e.rule:<16} {e.label:<10} {e.score:5.2f}  {snap}")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from appliance.status import DaemonStatus

    settings = _settings(args)
    if args.action != "status":
        url = _daemon_url(settings, f"/api/upgrade/{args.action}?hours={args.hours}")
        request = urllib.request.Request(url, method="POST", headers={"X-Appliance-CLI": "1"})
        try:
            print(_fetch_status(settings, request)["done"])
        except urllib.error.HTTPError as e:
            raise ApplianceError(json.loads(e.read() or b"{}").get("error") or f"HTTP {e.code}") from e
        return 0
    st = DaemonStatus.model_validate(_fetch_status(settings))
    up = st.upgrade
    if up is None:
        print(f"version {st.version}; the daemon has not started its upgrades yet")
        return 0
    print(f"running {up.running}  previous {up.previous or '-'}  desired {up.desired or '-'}  state {up.state}"
          f"{'' if up.launcher else '  (not under appliance-launcher: upgrades are off)'}")
    if up.reason:
        print(f"  {up.reason}")
    if up.total:
        print(f"  downloaded {up.received} of {up.total} bytes")
    if up.window:
        print(f"  switches only between {up.window} (local time)")
    if up.postponed_until:
        print(f"  postponed until {_time(up.postponed_until)}")
    for h in up.history[:10]:
        print(f"  {_time(h.ts)}  {h.from_version} -> {h.to_version}  {h.outcome}  {h.reason}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from appliance import __version__
    from appliance.status import DaemonStatus

    raw = _fetch_status(_settings(args))
    if args.json:
        print(json.dumps(raw, indent=2))
        return 0
    try:
        st = DaemonStatus.model_validate(raw)
    except ValidationError as e:
        raise ApplianceError(f"the daemon (version {raw.get('version', '?')}) answered a status this command "
                             f"(version {__version__}) cannot read: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}; "
                             "restart the daemon after an upgrade, or use --json") from e
    health = "OK" if st.health.ok else f"DEGRADED: {st.health.reason}"
    b = st.broker
    print(f"device {st.device}  version {st.version}  up {st.uptime_s:.0f} s  health {health}")
    print(f"broker {b.mode} {b.host}:{b.port} MQTT {b.protocol}  {'connected' if b.connected else 'NOT CONNECTED'}")
    workers = {w.partition: w for w in st.workers}
    print("\npartitions:")
    for p in st.partitions:
        w = workers[p.name]
        limit = f"{p.memory_mb} MB" if p.memory_mb else "no limit"
        cores = f" cores {','.join(map(str, p.cores))}" if p.cores else ""
        print(f"  {p.name:<10} {p.device:<12}{cores}  {p.provider:<24} worker {w.state} pid {w.pid} "
              f"restarts {w.restarts}  memory {p.memory_used_mb:.0f} MB / {limit}  apps {', '.join(p.apps) or '-'}")
        if w.restarts:
            print(f"             last restart: {w.last_restart_reason}")
        if p.utilisation_percent is not None:
            print(f"             utilisation {p.utilisation_percent:.0f}% ({p.utilisation_note})")
        elif p.kind == "mig":
            print(f"             utilisation: {p.utilisation_note}")
        if p.error:
            print(f"             ERROR: {p.error}")
    print("\nmodels:")
    for m in st.models:
        print(f"  {m.key:<30} {m.partition:<10} {m.state:<12} {','.join(m.providers)} {m.reason}")
    if not st.models:
        print("  (none loaded)")
    print("\napps:")
    for a in st.apps:
        print(f"  {a.name:<20} {a.version:<8} {a.model:<28} on {a.partition or '-':<10} {a.state:<9} "
              f"events {a.events} {a.reason}")
        if a.swap:
            print(f"      {a.swap}")
    if not st.apps:
        print("  (none)")
    print("\nsources:              fps rx/done/skip   received  processed  skipped  rejected")
    for s in st.sources:
        rejected = ", ".join(f"{k} {v}" for k, v in s.rejected.items()) or "0"
        print(f"  {s.kind:<6} {s.id:<12} {s.fps_received:5.1f}/{s.fps_processed:5.1f}/{s.fps_skipped:5.1f}"
              f"  {s.received:9d}  {s.processed:9d}  {s.skipped:7d}  {rejected}")
        if s.state != "receiving":
            print(f"         {s.state}: {s.reason}")
    unknown = st.unknown_sources
    if unknown.recent:
        names = ", ".join(u.id for u in unknown.recent[-10:])
        print(f"\nrejected messages from sources no app listens to: {sum(unknown.rejected.values())} ({names})")
    return 0


def _read_password(args: argparse.Namespace, user: str) -> str:
    """From stdin with --password-stdin (one line, for scripts), else typed twice at the terminal; never argv."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise ApplianceError("--password-stdin read an empty line; pipe the password in, e.g. "
                                 "`printf '%s\\n' \"$PW\" | appliance users add NAME --password-stdin`")
        return password
    if not sys.stdin.isatty():
        raise ApplianceError("no terminal to type the password on; pipe it in with --password-stdin")
    first = getpass.getpass(f"password for {user}: ")
    if getpass.getpass("again: ") != first:
        raise ApplianceError("the two passwords differ; nothing was changed")
    return first


def _cli_actor() -> Actor:
    """Who acts from the command line, for the audit log: the OS user, on the box itself."""
    from appliance.auth import Actor

    return Actor(f"cli:{_os_user()}", "local")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"uid{os.getuid()}"


def cmd_users(args: argparse.Namespace) -> int:
    from appliance.auth import Accounts, check_user_name
    from appliance.auth.passwords import check_password, hash_password

    if args.action == "hash-password":  # for a site configuration (provision site make): no store needed
        password = _read_password(args, args.name or "the site admin")
        check_password(password, args.name or "admin")
        print(hash_password(password))
        return 0
    settings = _settings(args)
    with _store(settings) as store:
        accounts = Accounts(store)
        by = _cli_actor()
        if args.action == "add":
            check_user_name(args.name)
            if store.users.get(args.name) is not None:
                raise ApplianceError(f"a user named {args.name!r} already exists; change the password with "
                                     f"`appliance users passwd {args.name}`")
            u = accounts.add_user(args.name, args.role, _read_password(args, args.name), by, args.language)
            print(f"added {u.role} {u.name}; log in at the console or with POST /api/v1/login")
        elif args.action == "passwd":
            if store.users.get(args.name) is None:
                raise ApplianceError(f"no user named {args.name!r} (see: appliance users list)")
            accounts.update_user(args.name, by, password=_read_password(args, args.name))
            print(f"password of {args.name} changed; their sessions were ended")
        elif args.action == "remove":
            u = accounts.remove_user(args.name, by)
            print(f"removed {u.role} {u.name}, with their sessions and API tokens")
        else:
            rows = store.users.all()
            if not rows:
                print("no users yet: create the first admin with: appliance users add NAME --role admin")
            for u in rows:
                print(f"{u.name:<24} {u.role:<9} {u.language:<3} {'disabled' if u.disabled else 'enabled '}  "
                      f"created {_time(u.created)}")
    return 0


def _config_file(args: argparse.Namespace) -> Path:
    path = args.config or os.environ.get("APPLIANCE_CONFIG")
    if not path:
        raise ApplianceError("give the settings file the daemon runs with: --config FILE (or APPLIANCE_CONFIG); "
                             "provisioning writes the site's settings into it")
    return Path(path)


def cmd_devices(args: argparse.Namespace) -> int:
    from appliance.devices.registry import Registry

    settings = _settings(args)
    if settings.broker.mode != "managed" and args.action in ("add", "renew"):
        print(f"note: broker.mode is {settings.broker.mode!r}; these credentials are used once the broker is "
              "managed (broker.mode = \"managed\", docs/devices.md)", file=sys.stderr)
    with _store(settings) as store:
        registry, by = Registry(settings, store), _cli_actor()
        if args.action in ("add", "renew"):
            if Path(args.out).exists() and (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
                raise ApplianceError(f"{args.out} exists and is not an empty folder; give a new folder")
            creds = (registry.add(args.id, args.kind, "password" if args.password else "certificate", by.name,
                                  by.address) if args.action == "add" else registry.renew(args.id, by.name, by.address))
            out = Path(args.out)
            written = creds.write(out)
            print(f"{'added' if args.action == 'add' else 'renewed'} {creds.device.kind} {creds.device.id}; its "
                  f"credentials are in {out}/ ({', '.join(p.name for p in written)}): hand them to the device and "
                  "delete the folder, the appliance keeps no copy of the key or password")
        elif args.action == "revoke":
            d = registry.revoke(args.id, by.name, by.address)
            print(f"revoked {d.id}: the broker refuses it from now on (appliance devices renew {d.id} lets it back)")
        elif args.action == "remove":
            registry.remove(args.id, by.name, by.address)
            print(f"removed {args.id}; its certificate stays revoked")
        elif args.action == "show":
            print(json.dumps(_device_json(store.devices.get(args.id)), indent=1))
        else:
            devices = store.devices.all()
            if not devices:
                print("no devices yet: appliance devices add cam1 --kind camera")
            for d in devices:
                state = "revoked" if d.revoked else "active"
                print(f"{d.id:<24} {d.kind:<7} {d.auth:<12} {state:<8} last connect {_time(d.last_connect)}, "
                      f"last message {_time(d.last_message)}, refused {d.refusals}"
                      + (f" (last {_time(d.last_refusal_ts)}: {d.last_refusal})" if d.refusals else ""))
            if refused := store.devices.refused_connections(20):
                print("\nrefused before the broker knew the device (newest first):")
            for r in refused:
                print(f"{r.address:<24} {r.listener:<12} {r.count:>5}x, last {_time(r.last)}: {r.reason}"
                      + (f" ({r.hint} connected from there before)" if r.hint else ""))
    return 0


def _device_json(d: DeviceRecord) -> dict[str, object]:
    return {"id": d.id, "kind": d.kind, "auth": d.auth, "created": d.created, "certificate_serial": d.cert_serial,
            "expires": d.expires, "revoked": d.revoked, "last_connect": d.last_connect, "last_message": d.last_message,
            "refusals": d.refusals, "last_refusal": d.last_refusal, "last_refusal_ts": d.last_refusal_ts}


def cmd_provision(args: argparse.Namespace) -> int:
    from appliance.console.firstboot import FirstBootPage
    from appliance.logs import setup_logging
    from appliance.provision import agent

    settings = _settings(args)
    setup_logging("INFO")
    a = agent(_config_file(args), settings, list(args.usb) if args.usb else None)
    page: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if not (args.once or args.no_page):
        try:
            page = FirstBootPage(settings.http, a.state_path, a.factory.serial)
        except ApplianceError as e:
            logging.getLogger("appliance.provision").warning("no first-boot page: %s", e)
    with page:
        state = a.run(wait=not args.once, timeout_s=args.timeout)
    last = state.steps[-1] if state.steps else None
    if state.state == "provisioned":
        print(f"provisioned: {state.device_id} ({state.site or 'no site name'}), configuration version "
              f"{state.version} from {state.owner_name}; start the appliance (appliance run)")
        return 0
    print(f"not provisioned yet ({state.state}): {last.step + ': ' + last.message if last else 'nothing found'}",
          file=sys.stderr)
    return 3


def cmd_factory_reset(args: argparse.Namespace) -> int:
    from appliance.provision import factory_reset

    settings = _settings(args)
    if not args.yes:
        raise ApplianceError(f"this removes the site's database, models, samples and settings under "
                             f"{settings.state_dir} (the factory identity stays); run again with --yes")
    with contextlib.suppress(DaemonUnreachable):
        _fetch_status(settings)
        raise ApplianceError("the appliance is running; stop it before a factory reset")
    removed = factory_reset(_config_file(args), settings)
    print(f"factory reset: removed {', '.join(removed) or 'nothing'}; the box provisions itself again at its next "
          "start (appliance provision)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo.run import run_demo

    path = args.config or os.environ.get("APPLIANCE_CONFIG")
    return run_demo(_settings(args), Path(path) if path else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description="Edge AI appliance daemon and tools.")
    p.add_argument("--config", "-c", help="settings file (TOML); also APPLIANCE_CONFIG")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", dest="config", default=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    models = sub.add_parser("models", help="install, list and remove model packages")
    msub = models.add_subparsers(dest="action", required=True)
    madd = msub.add_parser("add", help="install a model package (a folder with model.onnx and model.json)")
    madd.add_argument("path")
    msub.add_parser("list", help="list installed models")
    mrm = msub.add_parser("remove", help="remove a model no app uses")
    mrm.add_argument("name")
    mrm.add_argument("version")
    models.set_defaults(func=cmd_models)

    apps = sub.add_parser("apps", help="install, list, enable, disable and remove apps")
    asub = apps.add_subparsers(dest="action", required=True)
    aadd = asub.add_parser("add", help="install an app (app.json, or a folder holding it)")
    aadd.add_argument("path")
    asub.add_parser("list", help="list installed apps")
    for action in ("remove", "enable", "disable", "rollback"):
        a = asub.add_parser(action, help=f"{action} an app")
        a.add_argument("name")
    apps.set_defaults(func=cmd_apps)

    ev = sub.add_parser("events", help="show recent events")
    ev.add_argument("--limit", "-n", type=int, default=20)
    ev.add_argument("--app")
    ev.add_argument("--source")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_events)

    st = sub.add_parser("status", help="sources, rates, models and worker state of the running daemon")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    hw = sub.add_parser("hardware", help="CPU cores, GPUs and MIG devices, and the partitions planned on them")
    hw.add_argument("--json", action="store_true")
    hw.set_defaults(func=cmd_hardware)

    dev = sub.add_parser("devices", help="cameras' and sensors' credentials for the managed broker: add, list, "
                         "show, renew, revoke, remove")
    dsub = dev.add_subparsers(dest="action", required=True)
    dadd = dsub.add_parser("add", help="register a device and write its credentials (once) to a folder")
    dadd.add_argument("id", help="the device id: its topic is cameras/ID/frame or sensors/ID/telemetry")
    dadd.add_argument("--kind", choices=["camera", "sensor"], required=True)
    dadd.add_argument("--password", action="store_true", help="a user name and generated password instead of a "
                      "client certificate (for devices that cannot do TLS client certificates)")
    drenew = dsub.add_parser("renew", help="new credentials for a device; the old certificate is revoked")
    drenew.add_argument("id")
    for parser in (dadd, drenew):
        parser.add_argument("--out", required=True, help="a new folder for the credentials, on the medium that "
                            "takes them to the device (a USB stick): the box keeps no copy of the key or password")
    for action, text in (("show", "one device, as JSON"), ("revoke", "refuse the device from now on"),
                         ("remove", "forget the device (its certificate stays revoked)")):
        dsub.add_parser(action, help=text).add_argument("id")
    dsub.add_parser("list", help="every device, with its last connection and refusals")
    dev.set_defaults(func=cmd_devices)

    users = sub.add_parser("users", help="console users: add, list, remove, change a password")
    usub = users.add_subparsers(dest="action", required=True)
    uadd = usub.add_parser("add", help="add a user (the first admin is made this way; there is no default password)")
    uadd.add_argument("name")
    uadd.add_argument("--role", choices=["viewer", "operator", "admin"], required=True)
    uadd.add_argument("--language", choices=["en", "zh"], default="en")
    upw = usub.add_parser("passwd", help="set a user's password (ends their sessions)")
    upw.add_argument("name")
    for parser in (uadd, upw):
        parser.add_argument("--password-stdin", action="store_true",
                            help="read the password from the first line of standard input (for scripts)")
    uhash = usub.add_parser("hash-password", help="print a password hash for a site configuration (site.toml's "
                            "[admin] password_hash), without adding a user")
    uhash.add_argument("name", nargs="?", default="", help="whose password (checked against the name)")
    uhash.add_argument("--password-stdin", action="store_true", help="read it from standard input")
    usub.add_parser("list", help="list users")
    urm = usub.add_parser("remove", help="remove a user with their sessions and API tokens")
    urm.add_argument("name")
    users.set_defaults(func=cmd_users)

    up = sub.add_parser("upgrade", help="the appliance's own release: status, check now, apply, postpone, roll back")
    up.add_argument("action", nargs="?", default="status", choices=["status", "check", "apply", "postpone", "rollback"])
    up.add_argument("--hours", type=float, default=24.0, help="postpone: no switch for this many hours (default 24)")
    up.set_defaults(func=cmd_upgrade)

    prov = sub.add_parser("provision", help="zero-touch provisioning: find, verify and apply the owner's signed "
                          "site configuration, then enrol (the first-boot unit runs this)")
    prov.add_argument("--usb", action="append", help="where to look for a USB stick (glob; default: the factory's)")
    prov.add_argument("--once", action="store_true", help="look once and exit (3 when not provisioned)")
    prov.add_argument("--timeout", type=float, help="give up after this many seconds (exit 3)")
    prov.add_argument("--no-page", action="store_true", help="do not serve the read-only first-boot progress page "
                      "on the console's address while provisioning")
    prov.set_defaults(func=cmd_provision)

    reset = sub.add_parser("factory-reset", help="wipe the site's state and settings; keep the factory identity")
    reset.add_argument("--yes", action="store_true", help="really do it")
    reset.set_defaults(func=cmd_factory_reset)

    demo = sub.add_parser("demo", help="run the daemon with demo models, simulated cameras and a gas sensor")
    demo.set_defaults(func=cmd_demo)
    return p


CLI_NICE = 10  # added to a management command's nice value (see main)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func not in (cmd_run, cmd_demo):
        # a management command (installing a model checks and hashes it) must not take the cores from the
        # running daemon's inference: at a lower priority it only uses what serving leaves idle
        with contextlib.suppress(OSError):
            os.nice(CLI_NICE)
    try:
        result: int = args.func(args)
        return result
    except ApplianceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # translated at the boundary: the user sees what failed, not a traceback
        from appliance.store import StoreError
        from formats import FormatError

        if isinstance(e, (StoreError, FormatError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
