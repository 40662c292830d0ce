"""The self-test a new release passes before the box switches to it, run with the new release's own Python:

    releases/0.2.0/bin/python -m appliance.upgrade.selftest --config C --db COPY --model M.onnx ...

1. every module of the release imports;
2. the site's settings load (a release that no longer understands them would not start);
3. the database migrations run, on a copy of the live database;
4. every model the site serves loads in a scratch ONNX Runtime session and answers one run.

It prints one JSON line ``{"ok": bool, "problems": [...], "schema": N}`` and exits 0 only when all passed.
Whatever the release got wrong shows up here, not on the box's live data.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

PACKAGES = ("appliance", "appliance_launcher", "appstore_client", "formats", "common")
SKIPPED = ("appliance.demo",)  # tools for the demo, not what a box runs


def _imports() -> list[str]:
    problems = []
    for name in PACKAGES:
        try:
            package = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - whatever the release got wrong is reported
            problems.append(f"import {name}: {type(e).__name__}: {e}")
            continue
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            if info.name.startswith(SKIPPED) or info.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(info.name)
            except Exception as e:  # noqa: BLE001 - whatever the release got wrong is reported
                problems.append(f"import {info.name}: {type(e).__name__}: {e}")
    return problems


def _settings(config: Path | None) -> list[str]:
    from appliance.errors import ConfigError
    from appliance.settings import load_settings

    try:
        load_settings(config)
    except ConfigError as e:
        return [f"settings: {e}"]
    return []


def _migrations(db: Path) -> tuple[list[str], int]:
    from appliance.store import Store
    from appliance.store.migrations import SCHEMA_VERSION

    try:
        Store(db).close()
    except Exception as e:  # noqa: BLE001 - whatever the release got wrong is reported
        return [f"migrations on a copy of the database: {e}"], 0
    return [], SCHEMA_VERSION


def _models(paths: Sequence[Path]) -> list[str]:
    import numpy as np
    import onnxruntime as ort

    problems = []
    for path in paths:
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            inputs = session.get_inputs()
            # one run where every axis but the batch is fixed; with dynamic axes, loading is the test
            if all(isinstance(d, int) and d > 0 for i in inputs for d in i.shape[1:]):
                feeds = {i.name: np.zeros([1, *i.shape[1:]], dtype=np.float32 if "float" in i.type else np.int64)
                         for i in inputs}
                session.run(None, feeds)
        except Exception as e:  # noqa: BLE001 - whatever the release got wrong is reported
            problems.append(f"model {path}: {type(e).__name__}: {e}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.upgrade.selftest")
    p.add_argument("--config")
    p.add_argument("--db", required=True, help="a copy of the live database (it is migrated)")
    p.add_argument("--model", action="append", default=[], help="a model file the site serves; repeatable")
    args = p.parse_args(argv)
    problems: list[str] = []
    schema = 0
    try:
        problems += _imports()
        if not problems:
            problems += _settings(Path(args.config) if args.config else None)
            found, schema = _migrations(Path(args.db))
            problems += found
            problems += _models([Path(m) for m in args.model])
    except Exception:  # noqa: BLE001 - whatever the release got wrong is reported
        problems.append(traceback.format_exc(limit=3).strip().splitlines()[-1])
    print(json.dumps({"ok": not problems, "problems": problems, "schema": schema}))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
