"""Command line: ``appliance-launcher [--root DIR] [--config FILE] [--tries N] [--confirm-within S]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from appliance_launcher.launcher import RESTART_MAX_S, Options, main_loop
from common.backoff import Backoff

DEFAULT_ROOT = "/var/lib/appliance"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="appliance-launcher", description="Start the appliance's current release; "
                                "take back a new release that does not confirm its health.")
    p.add_argument("--root", default=os.environ.get("LAUNCHER_ROOT", DEFAULT_ROOT),
                   help=f"the folder holding releases/, current and previous (default {DEFAULT_ROOT})")
    p.add_argument("--config", default=os.environ.get("APPLIANCE_CONFIG"),
                   help="the appliance's settings file, passed to `appliance run --config`")
    p.add_argument("--tries", type=int, default=3, help="starts a new release gets to confirm its health (default 3)")
    p.add_argument("--confirm-within", type=float, default=180.0, metavar="SECONDS",
                   help="seconds after each start within which it must confirm (default 180)")
    p.add_argument("--stop-grace", type=float, default=30.0, metavar="SECONDS",
                   help="seconds a release gets to stop after SIGTERM (default 30)")
    p.add_argument("--restart-delay", type=float, default=1.0, metavar="SECONDS",
                   help="seconds before starting a release that crashed again, doubling with each crash in a row "
                        "up to 30 (default 1)")
    args = p.parse_args(argv)
    if args.tries < 1 or args.confirm_within <= 0 or args.stop_grace <= 0 or args.restart_delay <= 0:
        p.error("--tries must be at least 1, --confirm-within, --stop-grace and --restart-delay above 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return main_loop(Options(root=Path(args.root).resolve(), config=Path(args.config).resolve() if args.config else None,
                             tries=args.tries, confirm_within_s=args.confirm_within, stop_grace_s=args.stop_grace,
                             restart=Backoff(base_s=args.restart_delay, max_s=RESTART_MAX_S, jitter=0.0)))


if __name__ == "__main__":
    sys.exit(main())
