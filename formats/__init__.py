"""Wire formats shared by the appliance, the AppStore client and the reference AppStore.

Each format is declared once here and imported by both sides; nothing re-declares them.
"""

from formats.app_manifest import AppManifest, Debounce, ModelRef, Resources, Rule
from formats.errors import FormatError
from formats.model_card import (
    BoxesOutput,
    ClassificationOutput,
    ImageInput,
    ModelCard,
    ScoreOutput,
    VectorInput,
    YoloOutput,
)

__all__ = [
    "AppManifest",
    "BoxesOutput",
    "ClassificationOutput",
    "Debounce",
    "FormatError",
    "ImageInput",
    "ModelCard",
    "ModelRef",
    "Resources",
    "Rule",
    "ScoreOutput",
    "VectorInput",
    "YoloOutput",
]
