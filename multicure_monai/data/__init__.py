"""Data: the built-in phantom set, the UA-MT/MCF h5 converter, datalists and their validation, the
member-splitting post-transform."""

from __future__ import annotations

from .datalist import kfold_split, list_images, load_datalist, validate_datalist, write_datalist
from .la_h5 import convert_la_h5, kfold_datalists, read_la_h5
from .member_outputs import SplitMembersd
from .synthetic import ensure_phantom_dataset, generate_phantom_dataset, make_phantom

__all__ = [
    "SplitMembersd",
    "convert_la_h5",
    "ensure_phantom_dataset",
    "generate_phantom_dataset",
    "kfold_datalists",
    "kfold_split",
    "list_images",
    "load_datalist",
    "make_phantom",
    "read_la_h5",
    "validate_datalist",
    "write_datalist",
]
