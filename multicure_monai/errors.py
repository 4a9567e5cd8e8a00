"""The one error type of the project's input and configuration checks.

Every check that finds a problem the user can fix (a datalist entry, a config value, a checkpoint that does
not fit the configured networks, a folder that cannot be written) raises :class:`BundleInputError`, so the
bundle's entry points can print its message as the last lines of the output instead of a chained traceback
(:mod:`multicure_monai.bundle_cli`). It subclasses :class:`ValueError` so callers that catch ``ValueError``
keep working.
"""

from __future__ import annotations

__all__ = ["BundleInputError", "MissingFileError", "find_bundle_input_error"]


class BundleInputError(ValueError):
    """A problem in the user's data, configuration or files; the message names each problem and its fix."""


class MissingFileError(BundleInputError, FileNotFoundError):
    """A :class:`BundleInputError` whose only problems are files that do not exist.

    It is also a :class:`FileNotFoundError`, so callers that catch a missing file keep working.
    """


def find_bundle_input_error(exc: BaseException | None) -> BundleInputError | None:
    """The first :class:`BundleInputError` in ``exc``'s chain (``__cause__``, then ``__context__``), or None.

    MONAI's config parser wraps an error raised inside a config expression or component in a
    ``RuntimeError("Failed to evaluate ConfigExpression ...")`` chained to the original one.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BundleInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return None
