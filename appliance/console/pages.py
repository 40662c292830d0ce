"""The console's pages (GET): overview, alerts, sources, apps and models, system, users, login.

Each page reads what it shows from the daemon's status and the store, and renders it in the user's
language; the forms on them post to :mod:`appliance.console.forms`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response

from appliance.auth import Principal
from appliance.console.charts import sparkline
from appliance.console.web import PageAdmin, PageViewer, back, localizer, render, safe_next
from appliance.http.models import AppOut
from appliance.http.security import console, optional_user
from appliance.status import DaemonStatus
from appliance.store import EventRecord, HandlingRecord, NotFound
from appstore_client.client import version_key
from formats.provisioning import ProvisionState
from provisioning.agent import load_state
from provisioning.errors import ProvisioningError

router = APIRouter(include_in_schema=False)

Text = Annotated[str, Query(max_length=200)]
OVERVIEW_ALERTS = 8
ALERTS_PAGE = 50
EXPIRY_WARNING_S = 30 * 86400  # a device certificate this close to its end is shown in red
PERIODS: dict[str, float] = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}


def daemon_status(request: Request) -> DaemonStatus:
    """The daemon's status (``appliance status``)."""
    return console(request).status()


def health(status: DaemonStatus) -> tuple[str, str]:
    """green / amber / red and the reason in words (English; the template translates the headline)."""
    if not status.health.ok:
        return "red", status.health.reason
    problems = [f"app {a.name}: {a.reason}" for a in status.apps if a.state in ("degraded", "not placed")]
    problems += [f"partition {p.name}: {p.error}" for p in status.partitions if p.error]
    problems += [f"{s.kind} {s.id} is {s.state}: {s.reason}" for s in status.sources if s.state != "receiving"]
    if problems:
        return "amber", "; ".join(problems)
    return "green", ""


def _with_handling(request: Request, events: list[EventRecord]) -> list[tuple[EventRecord, list[HandlingRecord]]]:
    handling = console(request).store.handling.for_events([e.id for e in events])
    return [(e, handling.get(e.id, [])) for e in events]


@router.get("/", response_class=HTMLResponse)
def overview(who: PageViewer, request: Request) -> Response:
    ctx = console(request)
    status = daemon_status(request)
    level, reason = health(status)
    alerts = _with_handling(request, ctx.store.events.recent(limit=OVERVIEW_ALERTS))
    return render(request, "overview.html", who, status=status, level=level, reason=reason, alerts=alerts,
                  now=time.time())


@router.get("/alerts", response_class=HTMLResponse)
def alerts(who: PageViewer, request: Request, app: Text = "", source: Text = "", label: Text = "",
           period: Text = "") -> Response:
    ctx = console(request)
    since = time.time() - PERIODS[period] if period in PERIODS else None
    found = ctx.store.events.recent(limit=ALERTS_PAGE, app=app or None, source=source or None,
                                    label=label or None, since=since)
    status = daemon_status(request)
    choices = {"apps": sorted(a.name for a in status.apps),
               "sources": sorted(s.id for s in status.sources),
               "labels": sorted({e.label for e in ctx.store.events.recent(limit=500)})}
    filters = {"app": app, "source": source, "label": label, "period": period}
    return render(request, "alerts.html", who, alerts=_with_handling(request, found), filters=filters,
                  choices=choices, periods=list(PERIODS), filtered=any(filters.values()))


@router.get("/alerts/{event_id}", response_class=HTMLResponse)
def alert(event_id: str, who: PageViewer, request: Request) -> Response:
    ctx = console(request)
    event = ctx.store.events.get(event_id[:64])
    if event is None:
        raise NotFound(f"alert {event_id[:64]} is not stored (retention may have removed it)")
    [(_, handling)] = _with_handling(request, [event])
    return render(request, "alert.html", who, event=event, handling=handling)


@router.get("/sources", response_class=HTMLResponse)
def sources(who: PageViewer, request: Request) -> Response:
    ctx = console(request)
    status = daemon_status(request)
    charts: dict[str, list[tuple[str, str, float]]] = {}
    for s in status.sources:
        if s.kind == "sensor":
            trend = ctx.stats.trend(s.id) if ctx.stats else []
            channels = sorted({k for _, values in trend for k in values})
            charts[s.id] = [(c, sparkline([(t, v[c]) for t, v in trend if c in v]),
                             trend[-1][1].get(c, float("nan"))) for c in channels]
    cameras = [s for s in status.sources if s.kind == "camera"]
    sensors = [s for s in status.sources if s.kind == "sensor"]
    devices, refused = ctx.store.devices.all(), ctx.store.devices.refused_connections()
    return render(request, "sources.html", who, cameras=cameras, sensors=sensors, charts=charts, devices=devices, refused=refused,
                  managed=status.broker.mode == "managed", expiry_warning_s=EXPIRY_WARNING_S,
                  unknown=status.unknown_sources.recent, now=time.time())


@router.get("/sources/{source_id}/frame.jpg")
def source_frame(source_id: str, who: PageViewer, request: Request) -> Response:
    """A camera's latest accepted frame, as it arrived (never stored on disk)."""
    ctx = console(request)
    frame = ctx.stats.last_frame(source_id[:64]) if ctx.stats else None
    if frame is None:
        raise NotFound(f"no frame from camera {source_id[:64]} since the daemon started")
    return Response(frame[1], media_type="image/png" if frame[1].startswith(b"\x89PNG") else "image/jpeg",
                    headers={"cache-control": "no-store"})


@router.get("/apps", response_class=HTMLResponse)
def apps(who: PageViewer, request: Request) -> Response:
    ctx = console(request)
    status = daemon_status(request)
    runtime = {a.name: a for a in status.apps}
    installed = [AppOut.of(a, runtime.get(a.name)) for a in ctx.store.apps.all()]
    return render(request, "apps.html", who, apps=installed, models=status.models, partitions=status.partitions)


@router.get("/store", response_class=HTMLResponse)
def store(who: PageViewer, request: Request) -> Response:
    """The AppStore's catalog: what is published, what runs here, what could be updated."""
    ctx = console(request)
    link = daemon_status(request).appstore
    installed = {a.name: a.version for a in ctx.store.apps.all()}
    subscribed = set(ctx.store.subscriptions.all())
    rows = []
    for item in link.catalog:
        name = item.name
        mine = installed.get(name)
        desired = link.desired.get(name)
        rows.append({**item.model_dump(), "installed": mine, "subscribed": name in subscribed, "desired": desired,
                     "from_channel": desired is not None and name not in subscribed,
                     "update": mine is not None and mine != item.latest and item.latest not in ("", mine)
                     and version_key(item.latest) > version_key(mine)})
    return render(request, "store.html", who, link=link, rows=rows)


@router.get("/samples", response_class=HTMLResponse)
def samples(who: PageViewer, request: Request) -> Response:
    """Hard samples: counts by reason and state, drops, the upload state and the privacy policy in force."""
    ctx = console(request)
    info = daemon_status(request).samples
    recent = [(r, json.loads(r.meta_json)) for r in ctx.store.samples.recent(24)]
    return render(request, "samples.html", who, info=info, recent=recent)


@router.get("/samples/{sample_id}.jpg")
def sample_image(sample_id: str, who: PageViewer, request: Request) -> Response:
    """A queued sample's frame (an uploaded one has left the disk)."""
    ctx = console(request)
    data = ctx.samples.spool.image(sample_id[:64]) if ctx.samples and sample_id.isalnum() else None
    if data is None:
        raise NotFound(f"sample {sample_id[:64]} has no frame here (it was uploaded, dropped or never kept)")
    return Response(data, media_type="image/jpeg", headers={"cache-control": "no-store"})


@router.get("/system", response_class=HTMLResponse)
def system(who: PageViewer, request: Request) -> Response:
    ctx = console(request)
    status = daemon_status(request)
    disk = shutil.disk_usage(ctx.snapshots_dir.parent if ctx.snapshots_dir.parent.exists() else "/")
    audit = ctx.store.audit_log.recent(limit=100) if who.allows("admin") else []
    level, reason = health(status)
    return render(request, "system.html", who, status=status, disk=disk, audit=audit, level=level, reason=reason,
                  link=status.appstore, provisioning=provision_state(ctx.snapshots_dir.parent))


def provision_state(state_dir: Path) -> ProvisionState | None:
    """How this box was provisioned (``appliance provision``'s record), None if it never was or it is unreadable."""
    try:
        return load_state(state_dir / "provisioning" / "state.json")
    except ProvisioningError:
        return None


@router.get("/users", response_class=HTMLResponse)
def users(who: PageAdmin, request: Request) -> Response:
    ctx = console(request)
    return render(request, "users.html", who, users=ctx.store.users.all(), tokens=ctx.store.tokens.all())


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, who: Annotated[Principal | None, Depends(optional_user)], next: Text = "/",
               ended: int = 0) -> Response:
    if who is not None and who.via == "session":
        return back(safe_next(next))
    loc = localizer(request, None)
    return render(request, "login.html", None, next=safe_next(next), ended=bool(ended), error=None,
                  lang=loc.language)
