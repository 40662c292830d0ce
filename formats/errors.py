"""Errors raised while reading a wire format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class FormatError(ValueError):
    """A document does not follow its format; the message names the file and the key."""


def describe_validation_error(
    err: ValidationError, where: str | Callable[[tuple[int | str, ...]], str], docs: str = "docs/formats.md"
) -> str:
    """One line per problem: ``where: key.path: message``; ``where`` may depend on the key."""
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        msg = problem["msg"]
        if problem["type"] == "extra_forbidden":
            msg = f"unknown key (check the spelling against {docs})"
        origin = where if isinstance(where, str) else where(tuple(problem["loc"]))
        lines.append(f"{origin}: {key}: {msg}")
    return "\n".join(lines)


def load_json_document(model: type[M], path: Path) -> M:
    """Read ``path`` as JSON and validate it as ``model``, raising FormatError with a precise message."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from e
    return parse_json_document(model, raw, str(path))


def parse_json_document(model: type[M], raw: bytes, where: str) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        if any(p["type"] == "json_invalid" for p in e.errors()):
            raise FormatError(f"{where}: not valid JSON: {e.errors()[0]['msg']}") from e
        raise FormatError(describe_validation_error(e, where)) from e
