"""Words for the states, roles and actions the daemon reports as identifiers, marked for translation.

``N_`` only marks a string for ``make messages``; the page translates it when it shows it
(``label("silent")`` in a template).
"""

from __future__ import annotations


def N_(message: str) -> str:
    return message


LABELS: dict[str, str] = {
    # menu
    "Overview": N_("Overview"), "Alerts": N_("Alerts"), "Sources": N_("Sources"),
    "Apps and models": N_("Apps and models"), "Store": N_("Store"), "Samples": N_("Samples"), "System": N_("System"),
    "Users": N_("Users"),
    # hard samples
    "near_threshold": N_("Close to the threshold"), "random": N_("Random"), "class": N_("By class"),
    "queued": N_("Waiting to upload"), "uploaded": N_("Uploaded"), "metadata-only": N_("Metadata only"),
    "full": N_("Full frames"), "uploading": N_("Uploading"), "retrying": N_("Retrying"), "idle": N_("Idle"),
    "no AppStore": N_("No AppStore"),
    # AppStore link
    "off": N_("Not set up"), "syncing": N_("Syncing"), "in sync": N_("Up to date"), "offline": N_("Unreachable"),
    "refused": N_("Update refused"),
    # the appliance's own upgrades
    "waiting": N_("Waiting"), "postponed": N_("Postponed"), "downloading": N_("Downloading"),
    "installing": N_("Installing"), "testing": N_("Testing"), "switching": N_("Switching"),
    "confirming": N_("Checking the new software"), "upgraded": N_("Up to date"), "rolled back": N_("Rolled back"),
    "confirmed": N_("Confirmed"), "rollback": N_("Rolled back by an admin"),
    # provisioning
    "unprovisioned": N_("Not provisioned"), "applied": N_("Configured, enrolling"), "provisioned": N_("Provisioned"),
    "find": N_("Looking for the configuration"), "bundle": N_("Provisioning bundle"),
    "voucher": N_("Ownership voucher"), "owner certificate": N_("Owner certificate"),
    "conveyed information": N_("Site configuration"), "settings": N_("Settings"), "apply": N_("Applying"),
    "enrol": N_("Enrolment"),
    # roles
    "admin": N_("admin"), "operator": N_("operator"), "viewer": N_("viewer"),
    # sources
    "receiving": N_("Receiving"), "silent": N_("Silent"), "rejecting": N_("Rejecting"),
    "camera": N_("Camera"), "sensor": N_("Sensor"),
    # the managed broker's listeners
    "certificate": N_("Client certificate"), "password": N_("User name and password"),
    "daemon": N_("The appliance's own"), "anonymous": N_("Anonymous (development)"),
    # apps, models, workers
    "serving": N_("Serving"), "degraded": N_("Degraded"), "disabled": N_("Disabled"),
    "not placed": N_("Not placed"), "loading": N_("Loading"), "ready": N_("Ready"), "failed": N_("Failed"),
    "quarantined": N_("Quarantined"), "starting": N_("Starting"), "restarting": N_("Restarting"),
    "stopped": N_("Stopped"),
    # handling
    "acknowledged": N_("Acknowledged"), "false_positive": N_("False positive"),
    "missed_detection": N_("Missed detection"), "note": N_("Note"),
    # health
    "green": N_("Working normally"), "amber": N_("Working, with warnings"), "red": N_("Needs attention"),
    # time filters
    "1h": N_("Last hour"), "24h": N_("Last 24 hours"), "7d": N_("Last 7 days"), "30d": N_("Last 30 days"),
}
