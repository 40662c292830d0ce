"""The appliance's one connection to its AppStore, built from ``[appstore]`` once at start.

The sync (TUF catalog and downloads), the status reports, the sample uploader, and next enrolment and
self-upgrade all take it from here, so the TLS settings (a private CA, a client certificate) and the
timeouts hold for every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance import __version__
from appliance.settings import Settings
from appstore_client.connection import Connection, ConnectionOptions
from appstore_client.fleet import FleetClient


@dataclass(frozen=True, slots=True)
class AppStoreLink:
    connection: Connection
    fleet: FleetClient | None  # None without a device token: nothing is reported or uploaded

    def close(self) -> None:
        self.connection.close()


def appstore_link(settings: Settings) -> AppStoreLink | None:
    """The link, or None when no AppStore is set (``appstore.url``)."""
    a = settings.appstore
    if not a.url:
        return None
    connection = Connection(ConnectionOptions(a.url, ca_file=a.ca_file, cert_file=a.cert_file, key_file=a.key_file,
                                              user_agent=f"edge-appliance/{__version__}"))
    fleet = FleetClient(connection, settings.device_id, a.device_token) if a.device_token else None
    return AppStoreLink(connection, fleet)
