"""The reference AppStore's sample inbox (docs/samples.md): real HTTP on loopback, real multipart, real SQLite.

One repository and one in-thread server for the module, with the inbox's limits made small so that "too
large" costs kilobytes, not 16 MB; each test registers its own devices so their samples do not mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image

from appstore.samples import InboxLimits
from appstore.server import build_app
from tests.conftest import wait_until
from tests.test_appstore import ok, raw_get, refused

LIMITS = InboxLimits(max_image_bytes=32 * 1024, max_meta_bytes=8 * 1024)


@dataclass
class Inbox:
    repo: Path
    url: str
    admin_token: str

    def device(self, device: str) -> str:
        """Register ``device``; returns its token."""
        return ok(self.repo, "devices", "add", device).strip().splitlines()[-1]

    def put(self, device: str, sample_id: str, token: str | None, meta: dict[str, Any] | bytes | None,
            image: bytes | None = None) -> httpx.Response:
        files: dict[str, tuple[str | None, bytes, str]] = {}
        if meta is not None:
            files["meta"] = (None, meta if isinstance(meta, bytes) else json.dumps(meta).encode(), "application/json")
        if image is not None:
            files["image"] = (f"{sample_id}.jpg", image, "image/jpeg")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.put(f"{self.url}/v1/devices/{device}/samples/{sample_id}", files=files, headers=headers,
                         timeout=30)

    def listing(self, token: str | None = None, **params: str) -> httpx.Response:
        token = token or self.admin_token
        return httpx.get(f"{self.url}/v1/samples", params=params, headers={"Authorization": f"Bearer {token}"},
                         timeout=30)

    def files(self, device: str) -> list[str]:
        """Every file in the device's sample folder, temporary ones included."""
        folder = self.repo / "samples" / device
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def inbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inbox]:
    repo = tmp_path_factory.mktemp("inbox") / "repo"
    ok(repo, "keys", "init")
    admin = ok(repo, "admin-token").strip().splitlines()[-1]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(repo, LIMITS), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, what="the in-thread AppStore server")
        yield Inbox(repo, f"http://127.0.0.1:{port}", admin)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def new_id() -> str:
    return uuid.uuid4().hex


def jpeg(seed: int = 0) -> bytes:
    """A real small JPEG; a different ``seed`` gives different bytes."""
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (seed * 37 % 256, seed * 11 % 256, 200)).save(out, "JPEG")
    return out.getvalue()


def record(sample_id: str, device: str, image: bytes | None = None, **changes: Any) -> dict[str, Any]:
    """The sample record of docs/samples.md, describing ``image`` (None: a metadata-only sample)."""
    meta = {"schema": 1, "id": sample_id, "device": device, "site": "St Mary ward 7", "app": "ppe-watch",
            "app_version": "1.1.0", "model": "demo-detector@1.1.0", "source": "cam1", "ts": 1732000000.5,
            "reason": "near_threshold",
            "predictions": [{"label": "person", "score": 0.52, "box": [0.1, 0.2, 0.3, 0.5]}],
            "privacy": "full" if image is not None else "metadata-only", "redacted": ["person"],
            "image": None if image is None else {"sha256": hashlib.sha256(image).hexdigest(), "bytes": len(image),
                                                 "width": 64, "height": 48}}
    return {**meta, **changes}


STORED = {"stored": True}
DUPLICATE = {"stored": False, "duplicate": True}


def test_a_sample_is_stored_once_and_only_from_its_own_device(inbox: Inbox) -> None:
    token = inbox.device("ward-7")
    other = inbox.device("ward-8")
    sid, image = new_id(), jpeg(1)
    meta = json.dumps(record(sid, "ward-7", image)).encode()

    r = inbox.put("ward-7", sid, None, meta, image)
    assert r.status_code == 401 and "Bearer" in r.json()["error"]
    assert inbox.put("ward-7", sid, "not-a-token", meta, image).status_code == 401
    r = inbox.put("ward-7", sid, other, meta, image)
    assert r.status_code == 403 and "another device" in r.json()["error"]
    r = inbox.put("ward-7", sid, inbox.admin_token, meta, image)
    assert r.status_code == 401 and "device token" in r.json()["error"]
    assert inbox.files("ward-7") == []

    r = inbox.put("ward-7", sid, token, meta, image)
    assert (r.status_code, r.json()) == (201, STORED)
    folder = inbox.repo / "samples" / "ward-7"
    assert (folder / f"{sid}.json").read_bytes() == meta and (folder / f"{sid}.jpg").read_bytes() == image

    r = inbox.put("ward-7", sid, token, meta, image)  # a retry after a lost answer
    assert (r.status_code, r.json()) == (200, DUPLICATE)
    changed = jpeg(2)
    r = inbox.put("ward-7", sid, token, record(sid, "ward-7", changed, reason="random"), changed)
    assert (r.status_code, r.json()) == (200, DUPLICATE)
    assert (folder / f"{sid}.json").read_bytes() == meta and (folder / f"{sid}.jpg").read_bytes() == image
    assert inbox.files("ward-7") == [f"{sid}.jpg", f"{sid}.json"]

    listed = inbox.listing(device="ward-7").json()
    assert listed["total"] == 1 and listed["samples"][0]["meta"] == json.loads(meta)
    assert listed["samples"][0]["has_image"] is True


def test_a_metadata_only_sample_is_stored_without_a_jpg(inbox: Inbox) -> None:
    token = inbox.device("private-1")
    sid = new_id()
    r = inbox.put("private-1", sid, token, record(sid, "private-1"))
    assert (r.status_code, r.json()) == (201, STORED)
    assert inbox.files("private-1") == [f"{sid}.json"]
    item = inbox.listing(device="private-1").json()["samples"][0]
    assert item["has_image"] is False and item["meta"]["image"] is None and item["meta"]["privacy"] == "metadata-only"


def test_a_bad_delivery_is_refused_and_stores_nothing(inbox: Inbox) -> None:
    token = inbox.device("bad-1")
    sid, image = new_id(), jpeg(3)
    good = record(sid, "bad-1", image)

    def refused_with(status: int, meta: dict[str, Any] | bytes | None, img: bytes | None, sample_id: str = sid) -> str:
        r = inbox.put("bad-1", sample_id, token, meta, img)
        assert r.status_code == status, (r.status_code, r.text)
        message: str = r.json()["error"]
        return message

    wrong = {**good["image"], "sha256": hashlib.sha256(b"other").hexdigest()}
    assert "sha256" in refused_with(400, {**good, "image": wrong}, image)
    assert "bytes" in refused_with(400, {**good, "image": {**good["image"], "bytes": len(image) + 1}}, image)
    assert "not a JPEG" in refused_with(400, record(sid, "bad-1", b"GIF89a" + image), b"GIF89a" + image)
    assert "meta" in refused_with(400, None, image)
    assert "not valid JSON" in refused_with(400, b"{not json", image)
    assert "reason" in refused_with(400, {**good, "reason": "boredom"}, image)
    assert "box" in refused_with(400, {**good, "predictions": [{"label": "person", "score": 0.5, "box": [0, 0, 2, 1]}]},
                                 image)
    assert "sent as" in refused_with(400, {**good, "id": new_id()}, image)
    assert "own samples" in refused_with(400, {**good, "device": "ward-7"}, image)
    assert "meta.image is null" in refused_with(400, {**good, "image": None}, image)
    assert "no 'image' part" in refused_with(400, good, None)
    assert "sample id" in refused_with(400, record("short", "bad-1", image), image, sample_id="short")
    assert "sample id" in refused_with(400, record("x" * 65, "bad-1", image), image, sample_id="x" * 65)
    r = httpx.put(f"{inbox.url}/v1/devices/bad-1/samples/{sid}", json=good, timeout=30,
                  headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]

    assert inbox.files("bad-1") == []  # no sample, no temporary file left behind
    assert inbox.listing(device="bad-1").json()["total"] == 0
    r = inbox.put("bad-1", sid, token, good, image)  # the refusals used up nothing: the first good one is stored
    assert (r.status_code, r.json()) == (201, STORED)


def test_an_image_over_the_limit_is_refused_with_413(inbox: Inbox) -> None:
    token = inbox.device("big-1")
    sid = new_id()
    over = jpeg(4) + os.urandom(LIMITS.max_image_bytes)  # fits in the request, not in the inbox
    r = inbox.put("big-1", sid, token, record(sid, "big-1", over), over)
    assert r.status_code == 413 and f"larger than {LIMITS.max_image_bytes} bytes" in r.json()["error"]

    huge = jpeg(4) + os.urandom(8 * LIMITS.max_body_bytes)  # refused by its Content-Length, before it is read
    r = inbox.put("big-1", sid, token, record(sid, "big-1", huge), huge)
    assert r.status_code == 413 and "the request is larger" in r.json()["error"]

    # the same without a Content-Length (chunked): refused while it is read
    request = httpx.Request("PUT", f"{inbox.url}/v1/devices/big-1/samples/{sid}", files={
        "meta": (None, json.dumps(record(sid, "big-1", huge)).encode(), "application/json"),
        "image": (f"{sid}.jpg", huge, "image/jpeg")})
    body = request.read()
    r = httpx.put(request.url, content=iter([body]), timeout=30, headers={
        "Content-Type": request.headers["Content-Type"], "Authorization": f"Bearer {token}"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and "the request is larger" in r.json()["error"]

    assert inbox.files("big-1") == []
    fits = jpeg(5)
    assert inbox.put("big-1", sid, token, record(sid, "big-1", fits), fits).status_code == 201


def test_the_listing_and_the_cli_count_per_device_and_reason(inbox: Inbox) -> None:
    token_a, token_b = inbox.device("list-a"), inbox.device("list-b")
    sent: list[dict[str, Any]] = []
    for device, token, reason in (("list-a", token_a, "near_threshold"), ("list-a", token_a, "random"),
                                  ("list-b", token_b, "false_positive"), ("list-a", token_a, "near_threshold")):
        sid, image = new_id(), jpeg(len(sent))
        meta = record(sid, device, image, reason=reason)
        assert inbox.put(device, sid, token, meta, image).status_code == 201
        sent.append(meta)

    assert httpx.get(f"{inbox.url}/v1/samples", timeout=30).status_code == 401
    r = inbox.listing(token_a)
    assert r.status_code == 403 and "admin token" in r.json()["error"]

    listed = inbox.listing(device="list-a").json()
    assert [s["meta"] for s in listed["samples"]] == [sent[3], sent[1], sent[0]]  # newest first
    assert all(set(s) == {"meta", "received", "has_image"} and s["has_image"] for s in listed["samples"])
    received = [s["received"] for s in listed["samples"]]
    assert received == sorted(received, reverse=True)
    assert listed["total"] == 3
    assert listed["counts"] == {"device": {"list-a": 3}, "reason": {"near_threshold": 2, "random": 1}}

    one = inbox.listing(device="list-a", reason="near_threshold", limit="1").json()
    assert [s["meta"] for s in one["samples"]] == [sent[3]] and one["total"] == 2
    assert inbox.listing(device="list-b").json()["counts"] == {"device": {"list-b": 1}, "reason": {"false_positive": 1}}
    assert inbox.listing(device="nobody").json() == {"samples": [], "total": 0, "counts": {"device": {}, "reason": {}}}
    for params in ({"reason": "boredom"}, {"limit": "lots"}, {"limit": "0"}, {"limit": "100000"}):
        r = inbox.listing(**params)
        assert r.status_code == 400 and r.json()["error"], params

    table = ok(inbox.repo, "samples", "--device", "list-a")
    assert all(m["id"] in table for m in sent if m["device"] == "list-a") and sent[2]["id"] not in table
    assert "3 samples" in table and "by device: list-a 3" in table and "by reason: near_threshold 2, random 1" in table
    table = ok(inbox.repo, "samples", "--device", "list-a", "--limit", "2")
    assert "the newest 2 shown" in table and sent[0]["id"] not in table
    assert json.loads(ok(inbox.repo, "samples", "--device", "list-b", "--json")) == inbox.listing(device="list-b").json()
    assert "no samples match" in ok(inbox.repo, "samples", "--device", "nobody")
    assert "not one of" in refused(inbox.repo, "samples", "--reason", "boredom")


def test_concurrent_deliveries_of_one_id_store_exactly_one(inbox: Inbox) -> None:
    token = inbox.device("race-1")
    sid = new_id()
    images = [jpeg(i) for i in range(20)]  # each delivery different, so the stored one shows who won
    assert len(set(images)) == 20
    metas = [json.dumps(record(sid, "race-1", image)).encode() for image in images]
    start = threading.Barrier(len(images))
    answers: list[tuple[int, int, dict[str, Any]]] = []

    def deliver(i: int) -> None:
        start.wait(10)
        r = inbox.put("race-1", sid, token, metas[i], images[i])
        answers.append((i, r.status_code, r.json()))

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 20
    winners = [i for i, status, body in answers if (status, body) == (201, STORED)]
    assert len(winners) == 1, answers
    assert all((status, body) == (200, DUPLICATE) for i, status, body in answers if i not in winners), answers

    folder = inbox.repo / "samples" / "race-1"
    assert inbox.files("race-1") == [f"{sid}.jpg", f"{sid}.json"]  # no temporary file left either
    assert (folder / f"{sid}.jpg").read_bytes() == images[winners[0]]
    assert (folder / f"{sid}.json").read_bytes() == metas[winners[0]]
    listed = inbox.listing(device="race-1").json()
    assert listed["total"] == 1 and listed["samples"][0]["meta"] == json.loads(metas[winners[0]])


def test_samples_are_never_served(inbox: Inbox) -> None:
    token = inbox.device("secret-1")
    sid, image = new_id(), jpeg(6)
    assert inbox.put("secret-1", sid, token, record(sid, "secret-1", image), image).status_code == 201
    assert (inbox.repo / "samples" / "secret-1" / f"{sid}.jpg").is_file()
    for name in (f"{sid}.jpg", f"{sid}.json"):
        for path in (f"/samples/secret-1/{name}", f"/metadata/../samples/secret-1/{name}",
                     f"/targets/../samples/secret-1/{name}", f"/targets/%2e%2e/samples/secret-1/{name}",
                     f"/metadata/..%2fsamples%2fsecret-1%2f{name}", f"/targets/..%2f..%2frepo/samples/secret-1/{name}",
                     "/samples/", "/samples/secret-1/"):
            status, body = raw_get(inbox.url, path)
            assert status == 404, (path, status)
            assert b"St Mary" not in body and image not in body and "error" in json.loads(body), path
