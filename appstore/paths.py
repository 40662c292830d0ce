"""Target paths of the contract (docs/appstore.md, "Target paths and custom metadata")."""

from __future__ import annotations

from formats.release import release_file_target, release_manifest_target

__all__ = ["app_manifest", "channel", "model_card", "model_file", "release_file_target", "release_manifest_target"]


def model_file(name: str, version: str) -> str:
    return f"models/{name}/{version}/model.onnx"


def model_card(name: str, version: str) -> str:
    return f"models/{name}/{version}/model.json"


def app_manifest(name: str, version: str) -> str:
    return f"apps/{name}/{version}/app.json"


def channel(name: str) -> str:
    return f"channels/{name}.json"
