"""The channel document and the device report (docs/appstore.md): the wire formats between the AppStore,
which signs channels and reads reports, and the appliance, which follows channels and sends reports."""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from formats.errors import parse_json_document
from formats.model_card import NAME_PATTERN, VERSION_PATTERN

AppName = Annotated[str, Field(pattern=NAME_PATTERN)]
Version = Annotated[str, Field(pattern=VERSION_PATTERN)]
ROLLOUT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rollout(_Strict):
    """A change on its way: the appliances in it take ``apps`` instead of the channel's."""

    id: str = Field(pattern=ROLLOUT_ID_PATTERN)
    apps: dict[AppName, Version]
    appliance: Version | None = None  # the appliance release the rollout's devices take (None: the channel's)
    percent: int = Field(default=0, ge=0, le=100)  # share of the channel's devices, by a stable hash
    groups: list[AppName] = Field(default_factory=list)  # device groups that are in regardless of percent
    halted: bool = False
    reason: str = ""
    max_unhealthy_share: float = Field(default=0.2, ge=0, le=1)
    window_s: int = Field(default=600, gt=0)  # seconds after the start during which the AppStore may halt it


class ChannelDoc(_Strict):
    """``channels/{channel}.json``: the desired state of every appliance on a channel."""

    schema_version: Literal[1] = Field(default=1, alias="schema")
    channel: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    apps: dict[AppName, Version]
    appliance: Version | None = None  # the appliance release every device runs (None: leave each as it is)
    # an appliance newer than ``appliance`` goes back to it only when this is true (None, left out: false)
    allow_downgrade: bool | None = None
    rollout: Rollout | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def apps_for(self, device_id: str, group: str) -> dict[str, str]:
        """What the appliance ``device_id`` in ``group`` should run."""
        if self.rollout is not None and not self.rollout.halted and in_rollout(self.rollout, device_id, group):
            return dict(self.rollout.apps)
        return dict(self.apps)

    def appliance_for(self, device_id: str, group: str) -> str | None:
        """The appliance release the device ``device_id`` in ``group`` should run (None: no opinion)."""
        r = self.rollout
        if r is not None and r.appliance is not None and not r.halted and in_rollout(r, device_id, group):
            return r.appliance
        return self.appliance

    @classmethod
    def parse(cls, raw: bytes, where: str) -> ChannelDoc:
        return parse_json_document(cls, raw, where)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n"


def in_rollout(rollout: Rollout, device_id: str, group: str) -> bool:
    """Whether a device is in the rollout: its group is named, or its stable bucket is below ``percent``.

    Membership only; a halted rollout sends its members back to the channel's apps (``ChannelDoc.apps_for``).
    """
    if group and group in rollout.groups:
        return True
    bucket = int(hashlib.sha256(f"{rollout.id}:{device_id}".encode()).hexdigest()[:8], 16) % 100
    return bucket < rollout.percent


class _Lenient(BaseModel):
    # a newer appliance may send more than this AppStore knows; extra keys are ignored, not refused
    model_config = ConfigDict(extra="ignore", frozen=True)


class AppStatus(_Lenient):
    version: str
    state: str  # "serving" when it runs; anything else (degraded, disabled, not placed) is not serving


class Health(_Lenient):
    ok: bool
    reason: str = ""


UpgradeStateName = Literal["idle", "waiting", "postponed", "downloading", "installing", "testing", "switching",
                           "confirming", "upgraded", "refused", "rolled back"]


class UpgradeReport(_Lenient):
    """The appliance's own upgrade, in a device report: ``refused`` with the reason makes the AppStore's guard
    count the device as unhealthy for a rollout of that version, like an app refused."""

    running: str  # the version serving now
    desired: str | None = None  # what the channel (or its rollout) asks for
    state: str = "idle"  # an UpgradeStateName; a newer appliance may send one this AppStore does not know
    reason: str = ""
    previous: str | None = None  # the release kept to roll back to


class DeviceReport(_Lenient):
    """The body of ``POST /v1/devices/{id}/status``."""

    device: str
    channel: str = ""
    group: str = ""
    rollout: str | None = None  # the rollout the appliance follows, if any
    apps: dict[str, AppStatus] = Field(default_factory=dict)
    health: Health
    last_sync: float | None = None  # epoch seconds
    last_error: str = ""
    version: str = ""  # the appliance's own version
    upgrade: UpgradeReport | None = None
