"""The appliance OS image and the release bundle builder (docs/upgrade.md)."""
