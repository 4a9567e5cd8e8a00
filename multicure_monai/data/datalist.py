"""Datalists: one import path for reading, writing, k-fold splitting, folder listing and validation.

This module re-exports the datalist API so that ``multicure_monai.data.datalist.<name>`` keeps working
(the bundle YAMLs call ``load_datalist``, ``validate_datalist``, ``studies_unlabeled``, ``list_images``
through it). Each job lives in its own module:

- :mod:`multicure_monai.data.datalist_io`: the datalist JSON format, :func:`load_datalist`,
  :func:`write_datalist`, :data:`DATALIST_KEYS`;
- :mod:`multicure_monai.data.kfold`: contiguous k-fold splits, :func:`kfold_split` and
  :func:`kfold_datalist` (one fold, in memory; writing all folds' files is
  :func:`multicure_monai.data.la_h5.kfold_datalists`);
- :mod:`multicure_monai.data.image_folders`: :func:`list_images` (a folder of images) and
  :func:`studies_unlabeled` (a MONAI Label studies folder), :data:`IMAGE_SUFFIXES`;
- :mod:`multicure_monai.data.datalist_check`: :func:`validate_datalist` and :func:`validate_datalists`, every
  problem of a datalist (or of all lists of a run) reported at once before training.

Two choices of the bundle's configs live here because they combine those modules: the unlabelled training
list (:func:`unlabeled_data`) and the images to run inference on (:func:`inference_data`).

Imports go one way: ``datalist_check -> la_h5 -> datalist_io, kfold``; nothing here is imported by
:mod:`multicure_monai.data.la_h5`.
"""

from __future__ import annotations

import os

from multicure_monai.data.datalist_check import validate_datalist, validate_datalists
from multicure_monai.data.datalist_io import DATALIST_KEYS, load_datalist, write_datalist
from multicure_monai.data.image_folders import IMAGE_SUFFIXES, list_images, studies_unlabeled
from multicure_monai.data.kfold import kfold_datalist, kfold_split

__all__ = [
    "DATALIST_KEYS",
    "IMAGE_SUFFIXES",
    "load_datalist",
    "list_images",
    "write_datalist",
    "kfold_split",
    "kfold_datalist",
    "validate_datalist",
    "validate_datalists",
    "studies_unlabeled",
    "unlabeled_data",
    "inference_data",
]


def unlabeled_data(datalist: str | os.PathLike | None, key: str, studies: list[dict] | None = None) -> list[dict]:
    """The unlabelled training list: ``studies`` when given, else the datalist's ``key`` list.

    MONAI Label passes only the labelled images of its studies folder; the bundle then gives the studies'
    images without a final label (:func:`studies_unlabeled`) as ``studies``. A datalist without ``key``
    yields an empty list (training without unlabelled data).

    Args:
        datalist: the datalist JSON; not read when ``studies`` is given.
        key: its unlabelled list, e.g. ``"unlabeled"``.
        studies: the unlabelled studies, or ``None``.

    Returns:
        ``studies`` itself, or the loaded list.
    """
    if studies is not None:
        return studies
    return load_datalist(datalist, key, missing_ok=True)


def inference_data(input_dir: str | os.PathLike | None, datalist: str | os.PathLike | None, key: str) -> list[dict]:
    """The images to run inference on: every image in ``input_dir`` when given, else the datalist's ``key`` list.

    Args:
        input_dir: a folder of images (:func:`list_images`), or ``None`` / ``""``.
        datalist: the datalist JSON; not read when ``input_dir`` is given.
        key: its list to infer, e.g. ``"validation"``.

    Returns:
        ``[{"image": path}, ...]`` (datalist entries keep their other keys).
    """
    if input_dir:
        return list_images(input_dir)
    return load_datalist(datalist, key)
