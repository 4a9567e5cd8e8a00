"""Image writers that never leave a partial file: a killed inference leaves whole masks or none.

MONAI's writers (``ITKWriter``, ``NibabelWriter``, ...) write straight to the target name, so a process killed
mid-write leaves a truncated ``*_seg.nii.gz`` that looks like a result. :func:`atomic_writer` returns a
subclass of the writer MONAI would pick for an extension whose ``write`` stages the file in a private
temporary folder (the backend needs a file name, and its extension picks the format) and then moves it into
place through :func:`multicure_monai.atomic_files.atomic_write` (temp file in the target folder,
fsync, rename). Use it as ``SaveImaged(writer=...)``.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import Any

from monai.data.image_writer import ImageWriter, resolve_writer

from multicure_monai.atomic_files import atomic_write

__all__ = ["AtomicWriteMixin", "atomic_writer"]


class AtomicWriteMixin:
    """``write`` of a MONAI :class:`~monai.data.ImageWriter` made atomic (put it before the writer class)."""

    def write(self, filename: str | os.PathLike, verbose: bool = False, **kwargs: Any) -> None:
        """Write the image to a private temporary file, then move it into ``filename`` in one rename.

        Args:
            filename: the target file; until the rename it keeps its previous content (or does not exist).
            verbose: passed to the backend's ``write``.
            kwargs: passed to the backend's ``write``.
        """
        filename = os.fspath(filename)
        with tempfile.TemporaryDirectory(prefix="multicure_write_") as tmp:
            staged = os.path.join(tmp, os.path.basename(filename))  # same name: the backend reads its extension
            super().write(staged, verbose=verbose, **kwargs)  # type: ignore[misc]
            with open(staged, "rb") as src:
                atomic_write(filename, lambda f: shutil.copyfileobj(src, f))


@functools.lru_cache(maxsize=None)
def _atomic_subclass(writer: type[ImageWriter]) -> type[ImageWriter]:
    return type(f"Atomic{writer.__name__}", (AtomicWriteMixin, writer), {"__module__": __name__})


def atomic_writer(ext: str = "nii.gz") -> type[ImageWriter]:
    """The atomic subclass of the first writer MONAI has available for ``ext`` (as ``SaveImaged`` picks it).

    Args:
        ext: the output file extension, with or without the leading dot (``"nii.gz"``, ``".nrrd"``).

    Returns:
        A writer class for ``SaveImaged(writer=...)``.
    """
    return _atomic_subclass(resolve_writer(ext.lstrip("."))[0])
