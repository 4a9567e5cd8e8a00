"""Datalist entries from folders of images: a plain image folder and a MONAI Label studies folder.

:func:`list_images` lists every image under a folder (the inference bundle's ``input_dir``).
:func:`studies_unlabeled` recovers the unlabelled images of a MONAI Label local studies folder, because
MONAI Label's ``BundleTrainTask`` hands the bundle only the labelled pairs and the semi-supervised
training also needs the rest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from multicure_monai.errors import BundleInputError, MissingFileError

__all__ = ["IMAGE_SUFFIXES", "list_images", "studies_unlabeled"]


#: File suffixes :func:`list_images` picks up (lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def list_images(folder: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[dict]:
    """Datalist entries ``{"image": path}`` for every image file under ``folder`` (recursive, sorted).

    Args:
        folder: folder to search.
        suffixes: file suffixes to accept (case-insensitive).

    Returns:
        Entries with absolute paths, sorted by path.

    Raises:
        MissingFileError: ``folder`` is not a directory (a ``FileNotFoundError``).
        BundleInputError: no image file found.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise MissingFileError(f"image folder not found: {folder}")
    suffixes = tuple(s.lower() for s in suffixes)
    found = sorted(
        os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.lower().endswith(suffixes)
    )
    if not found:
        raise BundleInputError(f"{folder}: no image files ({', '.join(suffixes)}) found")
    return [{"image": p} for p in found]


def studies_unlabeled(
    labelled: Sequence[Mapping[str, str]],
    label_subdir: str = os.path.join("labels", "final"),
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> list[dict] | None:
    """Unlabelled images of a MONAI Label local studies folder, or ``None`` outside that layout.

    MONAI Label's ``BundleTrainTask`` replaces ``train#dataset#data`` with the studies folder's labelled
    pairs, ``{"image": <studies>/<id><ext>, "label": <studies>/labels/final/<id><ext>}``, and passes no
    unlabelled list. When every entry of ``labelled`` has that layout and one studies folder, this returns
    ``[{"image": path}]`` for each image directly in that folder (not recursive) that is not in
    ``labelled``, sorted; it may be empty. It returns ``None`` when ``labelled`` is empty or not in that
    layout (a datalist JSON's ``training`` list), so the caller falls back to its own unlabelled list.

    Args:
        labelled: the labelled entries the bundle was given (``train#dataset#data``).
        label_subdir: folder of the final labels relative to the studies folder.
        suffixes: image file suffixes to accept (case-insensitive).

    Returns:
        Entries ``{"image": path}`` (absolute, sorted) of the studies folder's unlabelled images, or
        ``None`` when ``labelled`` is not a studies folder's labelled list.
    """
    if not labelled:
        return None
    folders = set()
    for item in labelled:
        image, label = item.get("image"), item.get("label")
        if not isinstance(image, str) or not isinstance(label, str):
            return None
        folder = os.path.dirname(os.path.realpath(image))
        if os.path.dirname(os.path.realpath(label)) != os.path.join(folder, label_subdir):
            return None
        folders.add(folder)
    if len(folders) != 1:
        return None
    folder = folders.pop()
    taken = {os.path.realpath(item["image"]) for item in labelled}
    suffixes = tuple(s.lower() for s in suffixes)
    found = sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.lower().endswith(suffixes) and os.path.isfile(os.path.join(folder, f))
    )
    return [{"image": p} for p in found if os.path.realpath(p) not in taken]
