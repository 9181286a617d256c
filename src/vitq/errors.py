"""User-facing errors.

Anything a user can cause (a bad path, an unknown recipe, bits out of range) raises
:class:`VitqError` with a one-line message that names the fix. The CLI prints the
message alone, never a traceback.
"""

from __future__ import annotations


class VitqError(Exception):
    """A mistake in the user's input; the message says how to fix it."""
