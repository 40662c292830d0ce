"""The appliance's own upgrades: the agent in the sync pass, the offline installer, the self-test, the health
confirmation and the carry-over after a rollback (docs/upgrade.md). The launcher is ``appliance_launcher``."""
