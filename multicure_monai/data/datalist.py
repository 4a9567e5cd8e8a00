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

Imports go one way: ``datalist_check -> la_h5 -> datalist_io, kfold``; nothing here is imported by
:mod:`multicure_monai.data.la_h5`.
"""

from __future__ import annotations

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
]
