"""``python -m appliance.demo.publish``: publish the next version of ppe-watch (with a new version of its model)
to the running demo's AppStore and put it on the demo channel; the appliance installs it by itself.

Each run publishes 1.1.0, then 1.2.0, and so on. The new app version asks for a slightly higher score and
a shorter cool-down, so that the change is visible in the alerts too.

``python -m appliance.demo.publish --release`` builds this tree as the next appliance release (0.1.1, then
0.1.2, ...), publishes it and names it on the demo channel: the appliance downloads it, installs it beside
the running one, tests it, switches, and confirms its health (console → System, or ``appliance upgrade``).
"""

from __future__ import annotations

import json
import sys

from appliance import __version__
from appliance.demo.modelgen import build_detector
from appliance.demo.run import DETECTOR_APP
from appliance.demo.store import CHANNEL, repo_dir, write_app_manifest
from appliance.settings import Settings, load_settings
from appstore import Fleet, Repository, channels, publish_app, publish_model
from appstore.catalog import publish_release as publish_release_folder
from appstore_client.client import version_key


def publish_release(settings: Settings, repo: Repository) -> int:
    from image import bundle

    doc = channels.read(repo, CHANNEL)
    major, minor, patch = (int(p) for p in (doc.appliance or __version__).split("+")[0].split(".")[:3])
    version = f"{major}.{minor}.{patch + 1}"
    print(f"building appliance {version} from this tree (the first time, the dependency wheels are fetched)")
    try:
        folder = bundle.build(settings.state_dir / "demo-releases", version=version)
    except bundle.BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    publish_release_folder(repo, folder)
    channels.set_apps(repo, Fleet(repo.layout.fleet_db), CHANNEL, None, appliance=version)
    print(f"published appliance {version} on channel {CHANNEL}; the appliance downloads it, installs it beside the "
          f"running one, tests it and switches within a minute: watch the log, `appliance upgrade` or the "
          f"console's System page")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    settings = load_settings(None)
    folder = repo_dir(settings)
    if not (folder / "metadata").is_dir():
        print(f"no demo AppStore in {folder}: start `make demo` first", file=sys.stderr)
        return 2
    repo = Repository(folder)
    if args == ["--release"]:
        return publish_release(settings, repo)
    if args:
        print("usage: python -m appliance.demo.publish [--release]", file=sys.stderr)
        return 2
    current = channels.read(repo, CHANNEL).apps.get("ppe-watch", "1.0.0")
    major, minor, _ = (int(p) for p in current.split("."))
    version = f"{major}.{minor + 1}.0"
    work = settings.state_dir / "demo-models" / f"ppe-watch-{version}"
    model = build_detector(work / "demo-detector")
    card = json.loads((model / "model.json").read_text())
    card["version"] = version
    (model / "model.json").write_text(json.dumps(card, indent=2))
    publish_model(repo, model)
    rules = DETECTOR_APP["rules"]
    assert isinstance(rules, list)
    rule = {**rules[0], "min_score": 0.6, "cooldown_s": 5}
    manifest = {**DETECTOR_APP, "version": version, "model": {"name": "demo-detector", "version": version},
                "description": f"Raise an alert when a person is seen on a camera ({version})", "rules": [rule]}
    publish_app(repo, write_app_manifest(work / "app.json", manifest))
    apps = dict(channels.read(repo, CHANNEL).apps)
    apps["ppe-watch"] = version
    channels.set_apps(repo, Fleet(repo.layout.fleet_db), CHANNEL, apps)
    assert version_key(version) > version_key(current)
    print(f"published ppe-watch {version} (model demo-detector {version}) on channel {CHANNEL}; the appliance "
          f"takes it at its next sync (within a few seconds): watch the log, `appliance apps list` or the console")
    return 0


if __name__ == "__main__":
    sys.exit(main())
