"""The first-boot agent: find a bundle, verify it, apply it, enrol; retry until done; resume after a power cut.

Sources are tried in order (USB sticks first, then the bootstrap URLs the box was given at the factory).
A bundle that does not verify is discarded with the reason, and the next one is tried; nothing of it is
applied. The first good one is applied (by the caller's ``apply``, all or nothing) and recorded in
``STATE/provisioning/state.json`` before the box enrols with the AppStore the configuration names. While
nothing is found, or the network or the AppStore is not there yet, the agent waits with backoff and tries
again. Every step is recorded in the state file (the console shows it) and logged, each cause at most
once a minute.
"""

from __future__ import annotations

import glob
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from common.backoff import Backoff
from common.files import write_atomically
from formats.errors import FormatError, load_json_document
from formats.provisioning import BUNDLE_FILE, ConveyedInformation, ProvisionState, ProvisionStep, StepOutcome
from provisioning.errors import ProvisioningError, Refused
from provisioning.factory import Factory
from provisioning.verify import Applied, Verified, verify_bundle

log = logging.getLogger("provisioning")

STEPS_KEPT = 50
LOG_EVERY_S = 60.0


class Unavailable(ProvisioningError):
    """A source cannot be asked now (no network, the AppStore not up yet): try again later."""


class Source(Protocol):
    @property
    def name(self) -> str: ...

    def fetch(self) -> list[tuple[str, bytes]]:
        """The bundles this source holds for the box, as (where, bytes); [] when none."""
        ...


@dataclass(frozen=True, slots=True)
class UsbSource:
    """USB sticks: ``<mount>/appliance/<serial>/provisioning.json`` under each of the factory's USB paths."""

    patterns: tuple[str, ...]
    serial: str

    @property
    def name(self) -> str:
        return "USB"

    def fetch(self) -> list[tuple[str, bytes]]:
        found: list[tuple[str, bytes]] = []
        for pattern in self.patterns:
            for mount in sorted(glob.glob(pattern)):
                path = Path(mount) / "appliance" / self.serial / BUNDLE_FILE
                try:
                    found.append((str(path), path.read_bytes()))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as e:
                    log.warning("cannot read %s: %s", path, e.strerror)
        return found


def load_state(path: Path) -> ProvisionState:
    if not path.is_file():
        return ProvisionState()
    try:
        return load_json_document(ProvisionState, path)
    except FormatError as e:
        raise ProvisioningError(f"{e}; remove it to provision this box from the start") from e


@dataclass
class Agent:
    factory: Factory
    state_path: Path
    sources: list[Source]
    apply: Callable[[Verified, str], None]  # (verified, where): all or nothing; Refused if the box cannot take it
    enrol: Callable[[ConveyedInformation], None]  # Unavailable to try later, Refused when the AppStore says no
    conveyed_path: Path  # the applied conveyed information, kept to enrol after a restart
    backoff: Backoff = field(default_factory=lambda: Backoff(base_s=1.0, max_s=60.0))
    sleep: Callable[[float], None] = time.sleep
    state: ProvisionState = field(init=False)
    _logged: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.state = load_state(self.state_path)
        self.state.serial = self.factory.serial

    def run(self, wait: bool = True, timeout_s: float | None = None) -> ProvisionState:
        """Until provisioned (or, with ``wait`` False, one look at every source); returns the state."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failures = 0
        while True:
            self.look()
            if self.state.state == "applied":
                self._enrol()
            if self.state.state == "provisioned" or not wait:
                return self.state
            failures += 1
            delay = self.backoff.delay(failures)
            if deadline is not None and time.monotonic() + delay > deadline:
                return self.state
            self.sleep(delay)

    def look(self) -> bool:
        """Try every source once; whether a new configuration was applied."""
        applied = Applied(self.state.owner, self.state.version) if self.state.version else None
        refused = False
        for source in self.sources:
            try:
                bundles = source.fetch()
            except Unavailable as e:
                self._record("find", "waiting", str(e), source.name)
                continue
            for where, raw in bundles:
                try:
                    verified = verify_bundle(raw, where, self.factory.serial, self.factory.makers, applied)
                    if not verified.fresh:
                        continue  # this configuration is applied here already
                    self.apply(verified, where)
                except Refused as e:
                    self._record(e.step, "refused", e.reason, where)
                    refused = True
                    continue
                self._applied(verified, where)
                return True
        if self.state.state == "unprovisioned" and not refused:
            self._record("find", "waiting", "no provisioning bundle found yet on "
                         f"{' or '.join(s.name for s in self.sources) or 'any source'}; trying again", "")
        return False

    def _applied(self, verified: Verified, where: str) -> None:
        c = verified.conveyed
        write_atomically(self.conveyed_path, c.model_dump_json(by_alias=True).encode(), mode=0o600)
        s = self.state
        s.state, s.owner, s.owner_name, s.version = "applied", verified.owner, verified.owner_name, c.version
        s.device_id, s.site, s.source, s.applied, s.enrolled = c.device_id, c.site, where, time.time(), None
        self._record("apply", "ok", f"applied the configuration of {verified.owner_name} for {c.device_id} "
                     f"(version {c.version}, voucher by {verified.maker})", where)

    def _enrol(self) -> None:
        try:
            conveyed = load_json_document(ConveyedInformation, self.conveyed_path)
        except FormatError as e:
            self._record("enrol", "refused", f"the applied configuration is unreadable ({e}); provision again", "")
            return
        try:
            self.enrol(conveyed)
        except Unavailable as e:
            self._record("enrol", "waiting", str(e), conveyed.appstore.url)
            return
        except Refused as e:
            self._record("enrol", "refused", e.reason, conveyed.appstore.url)
            return
        self.state.state, self.state.enrolled = "provisioned", time.time()
        self._record("enrol", "ok", f"enrolled with {conveyed.appstore.url} as {conveyed.device_id} on channel "
                     f"{conveyed.appstore.channel}", conveyed.appstore.url)

    def _record(self, step: str, outcome: StepOutcome, message: str, source: str) -> None:
        now = time.time()
        last = self.state.steps[-1] if self.state.steps else None
        if last is not None and (last.step, last.outcome, last.message, last.source) == (step, outcome, message, source):
            self.state.steps[-1] = ProvisionStep(ts=now, step=step, outcome=outcome, message=message, source=source)
        else:
            self.state.steps = [*self.state.steps[-(STEPS_KEPT - 1):],
                                ProvisionStep(ts=now, step=step, outcome=outcome, message=message, source=source)]
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.state_path, self.state.model_dump_json(by_alias=True, indent=1).encode())
        cause = f"{step}|{outcome}|{message}"
        if now - self._logged.get(cause, 0.0) >= LOG_EVERY_S:
            self._logged[cause] = now
            level = logging.INFO if outcome == "ok" else logging.WARNING
            log.log(level, "provisioning %s %s%s: %s", step, outcome, f" ({source})" if source else "", message)
