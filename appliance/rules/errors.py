"""Errors raised by the rules package."""

from __future__ import annotations

from appliance.errors import ApplianceError


class RulesError(ApplianceError):
    """Base class for errors from rule evaluation and snapshot rendering."""


class SnapshotError(RulesError, ValueError):
    """A frame could not be decoded, or rendering arguments are out of range.

    Subclasses ``ValueError`` so callers that only expect bad input as ``ValueError`` still catch it.
    """
