"""The one error type of the project's input and configuration checks.

Every check that finds a problem the user can fix (a datalist entry, a config value, a checkpoint that does
not fit the configured networks, a folder that cannot be written) raises :class:`BundleInputError`, so the
bundle's entry points can print its message as the last lines of the output instead of a chained traceback.
It subclasses :class:`ValueError` so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["BundleInputError"]


class BundleInputError(ValueError):
    """A problem in the user's data, configuration or files; the message names each problem and its fix."""
