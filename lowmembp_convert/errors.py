"""Exceptions raised by lowmembp_convert; each message names the module or file and the fix."""

from __future__ import annotations


class ConversionError(RuntimeError):
    """A conversion could not be carried out, or ``verify=True`` found a divergence."""


class CaptureError(RuntimeError):
    """The model's graph could not be captured (the report says what was done instead)."""
