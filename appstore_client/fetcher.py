"""A TUF fetcher that resumes downloads: HTTP Range, retries with backoff and jitter, partial files on disk.

python-tuf's own fetcher starts every download from the first byte; on a site link that drops now and
then, a model of a few hundred megabytes might never arrive. This one keeps what it has received of a
*target* in ``partial_dir`` (it survives a restart of the daemon) and asks for the rest with
``Range: bytes=N-``. Only content-addressed URLs are resumed — with consistent snapshots a target's
file name starts with its SHA-256 (``models/x/1.0.0/<sha256>.model.onnx``), so a partial file can only
ever be the beginning of those exact bytes; metadata (small, and not content-addressed) is always
fetched whole. TUF checks the length and hashes of the result, as always.

Progress of the running downloads is in :attr:`ResumableFetcher.progress` (for the console).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import urllib3
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from appstore_client.connection import Connection, ConnectionOptions
from common import crashpoint
from common.backoff import Backoff

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
RETRY_MAX_S = 30.0  # seconds: the longest wait before resuming a download
_CONTENT_ADDRESSED = re.compile(r"/[0-9a-f]{64}\.[^/]+$")


@dataclass(slots=True)
class Progress:
    url: str
    received: int
    total: int  # the most TUF allows (the target's length from signed metadata)
    resumed_from: int = 0


class ResumableFetcher(FetcherInterface):
    def __init__(self, partial_dir: Path, connection: Connection | None = None, *, retries: int = 4,
                 backoff_s: float = 0.5) -> None:
        self.partial_dir = partial_dir
        self.connection = connection or Connection(ConnectionOptions(url=""))
        self.retries = retries
        self.backoff = Backoff(base_s=backoff_s, max_s=RETRY_MAX_S)
        self._lock = threading.Lock()
        self.progress: dict[str, Progress] = {}
        self.requests = 0  # HTTP requests made, and body bytes received (for the cost of a refresh)
        self.bytes_received = 0

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        with self._lock:
            self.progress[url] = Progress(url, 0, max_length)
        try:
            with super().download_file(url, max_length) as f:
                yield f
        finally:
            with self._lock:
                self.progress.pop(url, None)

    def _partial(self, url: str) -> Path | None:
        if not _CONTENT_ADDRESSED.search(url):
            return None
        return self.partial_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.part"

    def _request(self, url: str, start: int) -> urllib3.BaseHTTPResponse:
        headers = {"Range": f"bytes={start}-"} if start else {}
        with self._lock:
            self.requests += 1
        try:
            response = self.connection.request("GET", url, headers=headers, preload_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise exceptions.DownloadError(self.connection.describe(e)) from e
        if response.status == 416 and start:  # the partial file is already whole (or the server disagrees)
            _done_with(response)
            return self._request(url, 0)
        if response.status >= 400:
            _done_with(response)
            raise exceptions.DownloadHTTPError(f"the AppStore answered HTTP {response.status} for {url}",
                                               response.status)
        return response

    def _fetch(self, url: str) -> Iterator[bytes]:
        partial = self._partial(url)
        have = partial.stat().st_size if partial is not None and partial.exists() else 0
        response = self._request(url, have)
        return self._stream(url, partial, have, response)

    def _stream(self, url: str, partial: Path | None, have: int, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
        if have and response.status == 206 and partial is not None:
            log.info("resuming %s from byte %d", url, have)
            self._note(url, have, resumed=True)
            with partial.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
        elif have and partial is not None:
            partial.unlink(missing_ok=True)  # the server ignored the Range: start again
            have = 0
        sink = partial.open("ab") if partial is not None else None
        attempt = 0
        try:
            while True:
                try:
                    # read1: whatever has arrived, so that bytes received before a cut are kept
                    while chunk := response.read1(CHUNK):
                        if sink is not None:
                            sink.write(chunk)
                            sink.flush()
                            crashpoint.reached(f"download.{url.rsplit('/', 1)[-1]}")  # the crash tests: killed mid-download
                        have += len(chunk)
                        self._note(url, len(chunk))
                        yield chunk
                    break
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    response.close()  # a broken connection never goes back to the pool
                    attempt += 1
                    if partial is None or attempt > self.retries:
                        raise exceptions.DownloadError(f"download of {url} broke off after {have} bytes "
                                                       f"({attempt} tries): {e}") from e
                    delay = self.backoff.delay(attempt)
                    log.warning("download of %s broke off after %d bytes (%s); resuming in %.1f s", url, have, e,
                                delay)
                    time.sleep(delay)
                    response = self._request(url, have)
                    if have and response.status != 206:
                        _done_with(response)
                        raise exceptions.DownloadError(f"{url}: the server does not resume downloads "
                                                       f"(HTTP {response.status} to a Range request)") from e
        except GeneratorExit:
            # the caller gave up on these bytes (more than the signed length): never resume from them
            if partial is not None:
                partial.unlink(missing_ok=True)
            raise
        finally:
            if sink is not None:
                sink.close()
            response.close()
        if partial is not None:
            partial.unlink(missing_ok=True)  # whole: TUF verifies it; a retry starts from zero

    def _note(self, url: str, n: int, resumed: bool = False) -> None:
        with self._lock:
            self.bytes_received += 0 if resumed else n
            p = self.progress.get(url)
            if p is not None:
                p.received += n
                if resumed:
                    p.resumed_from = n

    def close(self) -> None:
        self.connection.close()


def _done_with(response: urllib3.BaseHTTPResponse) -> None:
    """Read what is left of a small (error) answer so that its connection can be used again."""
    response.drain_conn()
    response.release_conn()
