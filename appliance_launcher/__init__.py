"""``appliance-launcher``: the small, stable program that starts the appliance's current release and takes
back a new release that does not prove itself healthy (docs/upgrade.md).

It is what systemd (or a person) runs, and it lives outside the releases: standard library only, with the
project's stdlib-only ``common``, so that no release, however broken, can break the way back::

    appliance-launcher --root /var/lib/appliance --config /etc/appliance/appliance.toml
"""

from appliance_launcher.state import BOOT_ENV, RESTART_EXIT, ROOT_ENV, LauncherState, Layout, Request

__all__ = ["BOOT_ENV", "RESTART_EXIT", "ROOT_ENV", "LauncherState", "Layout", "Request", "main"]


def main() -> int:
    from appliance_launcher.__main__ import main as _main

    return _main()
