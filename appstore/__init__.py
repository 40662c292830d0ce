"""The reference central AppStore: a TUF repository (python-tuf), a small fleet API and a sample inbox.

For labs, CI, demos and small fleets; the contract with the appliance is docs/appstore.md. The library
is used by the ``appstore`` CLI and by ``appstore serve``::

    repo, root_key_files = Repository.create(Path("appstore-repo"))
    publish_model(repo, Path("models/demo-detector"))
    channels.set_apps(repo, Fleet(repo.layout.fleet_db), "stable", {"ppe-watch": "1.0.0"})
"""

from appstore import channels
from appstore.catalog import Published, publish_app, publish_model
from appstore.errors import (
    AppStoreError,
    BadRequest,
    ChannelError,
    FleetError,
    Forbidden,
    PublishError,
    RepoError,
    TooLarge,
    Unauthorized,
)
from appstore.fleet import Fleet
from appstore.layout import Expiry, Layout
from appstore.repository import Repository
from appstore.samples import Inbox, InboxLimits
from formats.channel import ChannelDoc, DeviceReport, Rollout, in_rollout
from formats.sample import SampleRecord

__all__ = [
    "AppStoreError",
    "BadRequest",
    "ChannelDoc",
    "ChannelError",
    "DeviceReport",
    "Expiry",
    "Fleet",
    "FleetError",
    "Forbidden",
    "Inbox",
    "InboxLimits",
    "Layout",
    "PublishError",
    "Published",
    "RepoError",
    "Repository",
    "Rollout",
    "SampleRecord",
    "TooLarge",
    "Unauthorized",
    "channels",
    "in_rollout",
    "publish_app",
    "publish_model",
]
